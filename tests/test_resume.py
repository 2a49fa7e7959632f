"""Resume and interruption.

- N steps, stopped by a signal, then resumed to 2N match a straight 2N-step run: per-step losses N+1..2N and the
  final adapter, within the measured run-to-run noise (two straight runs; exactly 0 on CPU), for the default
  paged AdamW 32-bit and for paged AdamW 8-bit.
- The bitsandbytes paged state survives `state_dict` -> `torch.save` -> `load_state_dict`, back in paged buffers.
- SIGTERM through TRL's own script: exit 143 after a complete checkpoint, which `--resume_from_checkpoint true`
  continues; a second signal stops at once.
- Checkpoints and the final adapter are written atomically: a failure mid-save leaves nothing half-written.
"""

from __future__ import annotations

import copy
import io
import json
import os
import signal
import threading

import pytest
import torch
from transformers import TrainerCallback

from conftest import DATA, start_python, run_python
from qlora_plugin.training.checkpointing import STAGING_PREFIX, remove_stale_staging
from qlora_plugin.training.checkpoints import resolve_checkpoint
from qlora_plugin.core.errors import QLoRAPluginError
from qlora_plugin.training.interruption import signal_handlers
from qlora_plugin.strategies.paged_state import resumable

N = 3


@pytest.fixture(scope="module", autouse=True)
def ctrl_c_handled():
    """Ctrl-C as an interactive shell delivers it: a suite started as a background job (`make test &`) inherits
    SIGINT ignored, and the plugin rightly leaves an ignored signal alone (the last test here checks that)."""
    before = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)
CHECKPOINT_FILES = ("adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt",
                    "rng_state.pth", "trainer_state.json")


class InterruptAt(TrainerCallback):
    """Sends this process SIGINT at the end of one step, as Ctrl-C would."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            signal.raise_signal(signal.SIGINT)


def _train(model, dataset, out, optim, interrupt_at=None, resume=None):
    from trl import SFTConfig

    from qlora_plugin import make_trainer

    args = SFTConfig(output_dir=str(out), max_steps=2 * N, save_strategy="steps", save_steps=N, optim=optim,
                     per_device_train_batch_size=2, max_length=32, learning_rate=1e-3, logging_steps=1, seed=7,
                     report_to="none", use_cpu=True, disable_tqdm=True, resume_from_checkpoint=resume)
    callbacks = [InterruptAt(interrupt_at)] if interrupt_at else []
    trainer = make_trainer("qlora", model=model, args=args, train_dataset=dataset, callbacks=callbacks)
    if interrupt_at:
        with pytest.raises(SystemExit) as stopped:
            trainer.train()
        assert stopped.value.code == 128 + signal.SIGINT
    else:
        trainer.train()  # a resume comes from args.resume_from_checkpoint, as scripts that drop it do
    return trainer


def _losses(trainer) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}


def _adapter(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def _difference(a, b) -> float:
    if isinstance(a, dict) and a and isinstance(next(iter(a.values())), torch.Tensor):
        return max((a[k] - b[k]).abs().max().item() for k in a)
    return max(abs(a[k] - b[k]) for k in a)


@pytest.fixture(scope="module")
def small_dataset():
    from datasets import load_dataset

    return load_dataset(str(DATA), split="train").select(range(32))


@pytest.fixture(scope="module", params=["paged_adamw_32bit", "paged_adamw_8bit"])
def runs(request, tiny_models, small_dataset, tmp_path_factory):
    optim, model = request.param, tiny_models["llama"]
    root = tmp_path_factory.mktemp(optim)
    straight = [_train(model, small_dataset, root / f"straight{i}", optim) for i in (1, 2)]
    _train(model, small_dataset, root / "resumed", optim, interrupt_at=N)
    stopped_at = sorted(os.listdir(root / "resumed"))
    resumed = _train(model, small_dataset, root / "resumed", optim, resume=str(root / "resumed" / f"checkpoint-{N}"))
    return dict(optim=optim, straight=straight, resumed=resumed, stopped_at=stopped_at, root=root)


@pytest.mark.slow
def test_resume_matches_a_straight_run_within_the_noise(runs):
    (a, b), resumed = runs["straight"], runs["resumed"]
    later = lambda losses: {step: loss for step, loss in losses.items() if step > N}  # noqa: E731
    loss_noise = _difference(later(_losses(a)), later(_losses(b)))
    weight_noise = _difference(_adapter(a), _adapter(b))
    loss_gap = _difference(later(_losses(a)), later(_losses(resumed)))
    weight_gap = _difference(_adapter(a), _adapter(resumed))
    print(f"\n{runs['optim']}: run-to-run noise loss {loss_noise:.3g} weights {weight_noise:.3g}; "
          f"resumed vs straight loss {loss_gap:.3g} weights {weight_gap:.3g}")
    assert sorted(later(_losses(resumed))) == [N + 1, N + 2, 2 * N]
    assert loss_gap <= max(2 * loss_noise, 1e-6)
    assert weight_gap <= max(2 * weight_noise, 1e-6)
    # not a vacuous match: training moved the adapter between the checkpoint and the end
    assert _difference(_adapter(a), {k: torch.zeros_like(v) for k, v in _adapter(a).items()}) > 0
    assert _losses(a)[N + 1] != _losses(a)[2 * N]


@pytest.mark.slow
def test_interrupted_run_stopped_after_a_complete_checkpoint(runs):
    assert [name for name in runs["stopped_at"] if name.startswith("checkpoint-")] == [f"checkpoint-{N}"]
    assert not [name for name in runs["stopped_at"] if name.startswith(STAGING_PREFIX)]
    state = json.loads((runs["root"] / "resumed" / f"checkpoint-{N}" / "trainer_state.json").read_text())
    assert state["global_step"] == N


@pytest.mark.slow
def test_resumed_adapter_is_trainable_in_the_compute_dtype_and_owned_by_the_optimizer(runs):
    from qlora_plugin.ecosystem.runtime import cpu_has_native_bf16

    resumed = runs["resumed"]
    trainable = [p for p in resumed.model.parameters() if p.requires_grad]
    compute = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    # the compute dtype, as in the straight run: not peft's fp32 upcast when train() loads the checkpoint's adapter
    assert trainable and {p.dtype for p in trainable} == {compute}
    assert {p.dtype for p in runs["straight"][0].model.parameters() if p.requires_grad} == {compute}
    assert {id(p) for g in resumed.optimizer.param_groups for p in g["params"]} == {id(p) for p in trainable}
    states = [resumed.optimizer.state[p] for p in trainable]
    assert all(s["step"] == 2 * N for s in states)
    if runs["optim"] == "paged_adamw_8bit":
        assert any(s["state1"].dtype == torch.uint8 for s in states)  # the 8-bit state was really exercised


@pytest.mark.parametrize("name", ["PagedAdamW32bit", "PagedAdamW8bit"])
@pytest.mark.floor
def test_paged_state_round_trip(name, monkeypatch):
    import bitsandbytes.optim

    cls = resumable(getattr(bitsandbytes.optim, name))
    torch.manual_seed(0)
    model, x = torch.nn.Linear(64, 128), torch.randn(4, 64)  # 8192 weights: 8-bit state above 4096

    def steps(m, opt, n):
        for _ in range(n):
            opt.zero_grad()
            m(x).pow(2).mean().backward()
            opt.step()

    opt = cls(model.parameters(), lr=1e-2)
    steps(model, opt, 3)
    saved = io.BytesIO()
    torch.save(opt.state_dict(), saved)
    saved.seek(0)
    twin = copy.deepcopy(model)
    twin_opt = cls(twin.parameters(), lr=1e-2)
    twin_opt.load_state_dict(torch.load(saved, weights_only=True))
    steps(model, opt, 2)
    steps(twin, twin_opt, 2)
    assert torch.equal(model.weight, twin.weight) and torch.equal(model.bias, twin.bias)

    # What CUDA would do, simulated on CPU: paged moments are saved as ordinary tensors and loaded back paged.
    def paged_buffer(self, p, dtype=torch.float32):
        buffer = torch.zeros_like(p, dtype=dtype)
        buffer.is_paged = True
        return buffer

    opt.state[model.weight]["state1"].is_paged = True
    state = opt.state_dict()
    wrapped = state["state"][0][opt._FSDP_WRAPPED_QUANT_STATE_KEY]
    assert not getattr(wrapped["state1"], "is_paged", False)
    assert wrapped["state1"].data_ptr() != opt.state[model.weight]["state1"].data_ptr()
    monkeypatch.setattr(cls, "get_state_buffer", paged_buffer)
    fresh = cls(copy.deepcopy(model).parameters(), lr=1e-2)
    fresh.load_state_dict(state)
    for p, s in fresh.state.items():
        assert getattr(s["state1"], "is_paged", False) and torch.equal(s["state1"], opt.state[model.weight
                                                                       if p.dim() == 2 else model.bias]["state1"])
    plain = getattr(bitsandbytes.optim, name)(copy.deepcopy(model).parameters(), lr=1e-2)
    plain.load_state_dict(state)  # bitsandbytes alone: the moments come back as ordinary tensors
    assert not any(getattr(s["state1"], "is_paged", False) for s in plain.state.values())


def _checkpoint(root, step, complete=True):
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    if complete:
        (folder / "trainer_state.json").write_text("{}")
    return str(folder)


@pytest.mark.floor
def test_resolve_checkpoint(tmp_path):
    _checkpoint(tmp_path, 2)
    newest = _checkpoint(tmp_path, 10)
    _checkpoint(tmp_path, 12, complete=False)  # e.g. left by a run killed without this plugin
    (tmp_path / ".tmp-checkpoint-14").mkdir()
    for value in (True, "true", "True", "latest"):
        assert resolve_checkpoint(value, str(tmp_path)) == newest
    for value in (None, False, "false", ""):
        assert resolve_checkpoint(value, str(tmp_path)) is None
    assert resolve_checkpoint(newest, str(tmp_path)) == newest
    with pytest.raises(QLoRAPluginError, match="is not a folder.*checkpoint-10"):
        resolve_checkpoint(str(tmp_path / "checkpoint-7"), str(tmp_path))
    with pytest.raises(QLoRAPluginError, match="not a complete training checkpoint.*trainer_state.json"):
        resolve_checkpoint(str(tmp_path / "checkpoint-12"), str(tmp_path))
    with pytest.raises(QLoRAPluginError, match="no checkpoint-N folder in .*empty"):
        resolve_checkpoint("true", str(tmp_path / "empty"))
    remove_stale_staging(str(tmp_path))
    assert not (tmp_path / ".tmp-checkpoint-14").exists() and (tmp_path / "checkpoint-12").exists()


@pytest.mark.slow
def test_bad_resume_fails_before_the_model_loads(tiny_models, small_dataset, tmp_path, monkeypatch):
    from trl import SFTConfig

    from qlora_plugin import make_trainer
    from qlora_plugin.training import pipeline as trainer_module

    monkeypatch.setattr(trainer_module, "load_model", lambda *a: pytest.fail("model loaded"))
    args = SFTConfig(output_dir=str(tmp_path / "out"), resume_from_checkpoint=str(tmp_path / "nope"), use_cpu=True,
                     report_to="none")
    with pytest.raises(QLoRAPluginError, match="is not a folder"):
        make_trainer("qlora", model=tiny_models["llama"], args=args, train_dataset=small_dataset)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_checkpoint_and_final_adapter_are_written_atomically(runs, tmp_path, monkeypatch):
    trainer = runs["straight"][0]
    monkeypatch.setattr(trainer.args, "output_dir", str(tmp_path))
    boom = RuntimeError("disk full (injected)")

    def fail(*args, **kwargs):
        raise boom

    with monkeypatch.context() as m:
        m.setattr(trainer, "_save_rng_state", fail)  # after the adapter, optimizer and scheduler are written
        with pytest.raises(RuntimeError, match="injected"):
            trainer._save_checkpoint(trainer.model, trial=None)
    assert os.listdir(tmp_path) == ["README.md"]  # TRL's model card, written before the checkpoint
    trainer._save_checkpoint(trainer.model, trial=None)
    assert sorted(os.listdir(tmp_path)) == ["README.md", f"checkpoint-{2 * N}"]
    assert all((tmp_path / f"checkpoint-{2 * N}" / f).is_file() for f in CHECKPOINT_FILES)

    final = tmp_path / "final"
    with monkeypatch.context() as m:
        m.setattr(trainer.processing_class, "save_pretrained", fail)  # after the adapter weights are written
        with pytest.raises(RuntimeError, match="injected"):
            trainer.save_model(str(final))
    assert os.listdir(final) == []
    trainer.save_model(str(final))
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= set(os.listdir(final))
    assert not [name for name in os.listdir(final) if name.startswith(STAGING_PREFIX)]


def test_second_signal_stops_at_once():
    received = []
    before = signal.getsignal(signal.SIGINT)
    with signal_handlers(lambda signum, frame: received.append(signum)):
        signal.raise_signal(signal.SIGINT)
        assert received == [signal.SIGINT]
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # e.g. a background job: an ignored signal stays ignored
    try:
        with signal_handlers(lambda signum, frame: received.append(signum)):
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def _sft(model, dataset_dir, out, *extra):
    return ["-m", "trl.scripts.sft", "--model_name_or_path", model, "--dataset_name", str(dataset_dir), "--strategy",
            "qlora", "--output_dir", str(out), "--per_device_train_batch_size", "2", "--max_length", "32",
            "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "2", "--report_to", "none",
            "--use_cpu", "--disable_tqdm", "true", *extra]


@pytest.mark.slow
@pytest.mark.floor
def test_sigterm_through_trl_script_saves_a_checkpoint_that_resumes(tiny_models, tmp_path):
    out, dataset_dir = tmp_path / "out", tmp_path / "data"
    dataset_dir.mkdir()  # 64 rows of the bundled data: tokenizing all 2,000 twice would dominate the test
    rows = (DATA / "train.jsonl").read_text().splitlines(keepends=True)[:64]
    (dataset_dir / "train.jsonl").write_text("".join(rows))
    proc = start_python(_sft(tiny_models["llama"], dataset_dir, out, "--max_steps", "1000"), tmp_path)
    watchdog = threading.Timer(300, proc.kill)
    watchdog.start()
    lines, logged = [], 0
    for line in proc.stdout:
        lines.append(line)
        logged += "'loss'" in line
        if logged == 3 and "'loss'" in line:
            proc.send_signal(signal.SIGTERM)  # mid-run: after step 3, between the scheduled saves at 2 and 4
    code = proc.wait()
    watchdog.cancel()
    output = "".join(lines)
    assert code == 128 + signal.SIGTERM, output[-3000:]
    assert "Traceback" not in output and "stopped by SIGTERM" in output, output[-3000:]
    entries = sorted(os.listdir(out))
    assert not [e for e in entries if e.startswith(STAGING_PREFIX)], entries
    assert "adapter_model.safetensors" not in entries  # the script's final save did not run
    checkpoints = sorted((e for e in entries if e.startswith("checkpoint-")), key=lambda e: int(e.split("-")[1]))
    newest = int(checkpoints[-1].split("-")[1])
    assert newest >= 3, entries
    for name in checkpoints:
        _assert_complete(out / name, int(name.split("-")[1]))

    resumed = run_python(_sft(tiny_models["llama"], dataset_dir, out, "--max_steps", str(newest + 2),
                              "--resume_from_checkpoint", "true"), tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {out / checkpoints[-1]}" in resumed.stdout
    report = json.loads((out / "qlora_plugin_report.json").read_text())
    assert report["measured"]["steps"] == newest + 2
    assert (out / "adapter_model.safetensors").is_file()
    _assert_complete(out / f"checkpoint-{newest + 2}", newest + 2)


def _assert_complete(folder, step):
    from safetensors.torch import load_file

    assert all((folder / f).is_file() for f in CHECKPOINT_FILES), sorted(os.listdir(folder))
    assert load_file(str(folder / "adapter_model.safetensors"))
    assert torch.load(folder / "optimizer.pt", weights_only=True)["state"]
    assert torch.load(folder / "scheduler.pt", weights_only=True)["last_epoch"] == step
    assert "cpu" in torch.load(folder / "rng_state.pth", weights_only=False)
    assert json.loads((folder / "trainer_state.json").read_text())["global_step"] == step
