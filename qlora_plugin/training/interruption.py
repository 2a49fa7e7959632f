"""SIGTERM / Ctrl-C during training: finish the current step, save a checkpoint, stop, exit 128 + signal.

Preemptible jobs (Slurm, Kubernetes, spot instances) get SIGTERM and a grace period. Without this the process
dies mid-step and the work since the last scheduled checkpoint is lost. Installed by `checkpointing` only while
a strategy trainer's `train()` runs, on the main thread; signals the process ignores stay ignored. A second
signal restores the previous handlers and re-delivers it: the process stops at once (Ctrl-C: KeyboardInterrupt).
The exit status is 143 for SIGTERM and 130 for SIGINT, so a scheduler sees the job did not finish and can requeue
it with `--resume_from_checkpoint true`.

With several processes (DDP, FSDP, ZeRO-3) a signal may reach one rank only, or the ranks at different steps.
A rank that stopped alone would enter the checkpoint's collectives while the others run the next step's, and
all would hang. So the ranks agree at every step end (`agreed_signal`: one all-reduce of one integer) and all
stop after the same step, saving one checkpoint together.

Evaluation inside training can be long (many batches), longer than a scheduler's grace period. The ranks also
agree after every evaluation batch (`on_prediction_step`, which every rank reaches equally often: transformers
gathers each batch's results across ranks anyway); on a signal the evaluation is abandoned by raising
`EvaluationInterrupted`, which `graceful_stop` catches to save the checkpoint of the step training reached. The
abandoned evaluation's metrics are lost; a step end that already agreed on a signal skips the evaluation due there.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

from transformers import TrainerCallback

from qlora_plugin.ecosystem.compat import save_checkpoint
from qlora_plugin.training.checkpoints import newest_checkpoint

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def agreed_signal(signum: int | None) -> int | None:
    """The signal every rank acts on: the largest signal number any rank received (SIGTERM over SIGINT), or None.

    Every rank must call it at the same point. With several processes that is one all-reduce of one integer (on
    the process's device: NCCL needs a GPU tensor); a single process returns `signum` without communicating."""
    import torch
    from accelerate import PartialState

    state = PartialState()
    if state.num_processes < 2 or not torch.distributed.is_initialized():
        return signum
    received = torch.tensor([signum or 0], dtype=torch.int32, device=state.device)
    torch.distributed.all_reduce(received, op=torch.distributed.ReduceOp.MAX)
    return int(received.item()) or None


class EvaluationInterrupted(Exception):
    """Raised out of an evaluation loop, on every rank at the same batch, once the ranks agreed on a signal."""


class StopOnSignal(TrainerCallback):
    """Turns a signal received by any rank into `should_save` + `should_training_stop` at the end of the current
    step, or into `EvaluationInterrupted` after the current evaluation batch, on every rank."""

    def __init__(self):
        self.received: int | None = None  # what this process received (set by the handler, never overwritten)
        self.signum: int | None = None  # what all ranks agreed on
        self.acted = False
        self.active = False  # only inside `train()`: an evaluation the user runs afterwards pays no all-reduce

    def reset(self) -> None:
        self.received = self.signum = None
        self.acted = False

    def _stop(self, control, skip_evaluation: bool):
        self.signum = agreed_signal(self.received)
        if self.signum is not None:
            control.should_save = True
            control.should_training_stop = True
            if skip_evaluation:
                control.should_evaluate = False  # one due at this step would delay the save by a whole evaluation
            self.acted = True
        return control

    def on_step_end(self, args, state, control, **kwargs):
        return self._stop(control, skip_evaluation=True)

    def on_evaluate(self, args, state, control, **kwargs):  # a signal after the last evaluation batch
        return self._stop(control, skip_evaluation=False) if self.active else control

    def on_prediction_step(self, args, state, control, **kwargs):
        if self.active:
            self.signum = agreed_signal(self.received)
            if self.signum is not None:
                raise EvaluationInterrupted(signal.Signals(self.signum).name)
        return control

    def handle(self, signum, frame=None) -> None:
        name = signal.Signals(signum).name
        self.received = signum
        say(f"\n[qlora-plugin] {name}: finishing this step (or evaluation batch), saving a checkpoint, then stopping "
            f"(send {name} again to stop at once)\n")


def say(text: str) -> None:
    """Write to stderr from a signal handler or on the way out, never raising: the reader of the pipe may be gone
    (the launcher or a `| tee` killed first), and an error here would cost the checkpoint or the exit status."""
    try:
        os.write(2, text.encode())
    except OSError:
        pass


@contextlib.contextmanager
def signal_handlers(handler, signals=SIGNALS):
    """Route `signals` to `handler(signum, frame)` once; a second one goes to the handler that was there before."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}

    def restore():
        for signum, old in previous.items():
            signal.signal(signum, old)
        previous.clear()

    def on_signal(signum, frame):
        if signum in received:
            restore()
            signal.raise_signal(signum)
            return
        received.add(signum)
        handler(signum, frame)

    received: set[int] = set()
    for signum in signals:
        old = signal.getsignal(signum)
        if old in (signal.SIG_IGN, None):  # ignored (e.g. SIGINT in a background job), or not Python's to change
            continue
        previous[signum] = old
        signal.signal(signum, on_signal)
    try:
        yield
    finally:
        restore()


@contextlib.contextmanager
def graceful_stop(trainer):
    """Run the body (the Trainer's training loop) with signal handling; after a signal, exit 128 + signum."""
    stop = next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, StopOnSignal)), None)
    if stop is None:
        stop = StopOnSignal()
        trainer.add_callback(stop)
    stop.reset()
    stop.active = True
    abandoned = False
    try:
        with signal_handlers(stop.handle):
            try:
                yield
            except EvaluationInterrupted:
                abandoned = True  # every rank abandoned the evaluation at the same batch: save below
    finally:
        stop.active = False
    stop.signum = agreed_signal(stop.received)  # every rank gets here once training ends
    if stop.signum is None:
        return
    if not stop.acted:  # the signal came during an evaluation or after the last step: save the state reached
        save_checkpoint(trainer)
        # what the training loop does after each save: the callbacks' files (the quantization record) join it
        trainer.control = trainer.callback_handler.on_save(trainer.args, trainer.state, trainer.control)
    if abandoned:  # what a stop at a step end gets from the training loop: the callbacks' end (the run's report)
        trainer.control = trainer.callback_handler.on_train_end(trainer.args, trainer.state, trainer.control)
    if trainer.args.should_save:
        newest = newest_checkpoint(trainer.args.output_dir)
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()  # what the run printed before comes first
        say(f"[qlora-plugin] stopped by {signal.Signals(stop.signum).name} at step {trainer.state.global_step}; "
            f"checkpoint saved: {newest}. Resume with the same command plus `--resume_from_checkpoint true` "
            f"(or `{newest}`).\n")
    raise SystemExit(128 + stop.signum)
