"""Resume refuses what it cannot continue, and a signal stops an evaluation promptly.

- A checkpoint of the other strategy (16-bit base vs 4-bit), another `--lora_r`, a truncated adapter, a garbage
  `trainer_state.json`: one `QLoRAPluginError` naming the mismatch or the file, before the model loads (what the
  options decide) or, for what only the loaded model shows, in `train()` before anything is loaded from it.
- A checkpoint without `optimizer.pt`: refused, or resumed with a warning under `resume_without_optimizer`.
- SIGTERM during a long evaluation: the evaluation stops after the current batch, a checkpoint is saved, exit 143.
- A sequence-to-sequence model is refused before any weight is read.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import threading
import time

import pytest
from transformers import TrainerCallback

from conftest import DATA, run_python, start_python
from qlora_plugin.core.errors import QLoRAPluginError
from qlora_plugin.training.checkpoint_checks import safetensors_shapes

STEPS = 2


def _args(out, **extra):
    from trl import SFTConfig

    values = dict(output_dir=str(out), max_steps=STEPS, save_strategy="steps", save_steps=STEPS,
                  per_device_train_batch_size=2, max_length=32, learning_rate=1e-3, logging_steps=1, seed=7,
                  report_to="none", use_cpu=True, disable_tqdm=True)
    return SFTConfig(**{**values, **extra})


def _trainer(strategy, model, dataset, out, options=None, **extra):
    from qlora_plugin import make_trainer

    trainer_kwargs = extra.pop("trainer_kwargs", {})
    return make_trainer(strategy, model=model, args=_args(out, **extra), train_dataset=dataset,
                        options={"lora_r": 8, "init_lora_weights": "default", **(options or {})}, **trainer_kwargs)


@pytest.fixture(scope="module")
def small_dataset():
    from datasets import load_dataset

    return load_dataset(str(DATA), split="train").select(range(16))


@pytest.fixture(scope="module")
def checkpoint(tiny_models, small_dataset, tmp_path_factory):
    """checkpoint-2 of a 2-step qlora run (lora_r 8)."""
    out = tmp_path_factory.mktemp("qlora-run")
    _trainer("qlora", tiny_models["llama"], small_dataset, out).train()
    return out / f"checkpoint-{STEPS}"


@pytest.fixture
def copy_of(checkpoint, tmp_path):
    """A private copy of the checkpoint in a fresh run folder, to damage."""
    folder = tmp_path / "run" / checkpoint.name
    shutil.copytree(checkpoint, folder)
    return folder


@pytest.fixture
def no_loading(monkeypatch):
    from qlora_plugin.training import pipeline

    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))


def _resume(strategy, model, dataset, folder, options=None, **extra):
    return _trainer(strategy, model, dataset, folder.parent, options=options, resume_from_checkpoint=str(folder),
                    max_steps=STEPS + 1, **extra)


def _one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text and "Traceback" not in text
    return text


def test_the_other_strategy_is_refused_before_the_model_loads(tiny_models, small_dataset, copy_of, no_loading):
    # the qlora checkpoint into a lora run
    with pytest.raises(QLoRAPluginError) as err:
        _resume("lora", tiny_models["llama"], small_dataset, copy_of)
    assert "a 4-bit base (--strategy qlora); this run has a 16-bit base (--strategy lora)" in _one_line(err)
    # a lora checkpoint (its record says so) into a qlora run
    record = copy_of / "qlora_plugin_quantization.json"
    assert json.loads(record.read_text())["load_in_4bit"] is True
    record.write_text(json.dumps({"version": 1, "load_in_4bit": False}))
    with pytest.raises(QLoRAPluginError) as err:
        _resume("qlora", tiny_models["llama"], small_dataset, copy_of)
    assert "a 16-bit base (--strategy lora); this run has a 4-bit base (--strategy qlora)" in _one_line(err)


def test_the_other_strategy_is_refused_in_train_too(tiny_models, small_dataset, copy_of, tmp_path):
    """`trainer.train(resume_from_checkpoint=...)`: checked against the loaded model, before anything loads."""
    trainer = _trainer("lora", tiny_models["llama"], small_dataset, tmp_path / "lora")
    with pytest.raises(QLoRAPluginError, match=r"a 4-bit base \(--strategy qlora\); this run has a 16-bit"):
        trainer.train(resume_from_checkpoint=str(copy_of))
    assert trainer.state.global_step == 0


def test_another_lora_r_is_refused(tiny_models, small_dataset, copy_of, no_loading):
    with pytest.raises(QLoRAPluginError) as err:
        _resume("qlora", tiny_models["llama"], small_dataset, copy_of, options={"lora_r": 16})
    assert "trained with --lora_r 8; this run has --lora_r 16" in _one_line(err)


def test_another_adapter_config_is_refused_in_train(tiny_models, small_dataset, copy_of):
    """A peft_config of the user's: only the loaded model shows the rank; refused before transformers' size
    mismatch traceback. With the rank in the config matching but the tensors not (a config edited by hand),
    the shapes say so."""
    from peft import LoraConfig

    peft_config = LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = _resume("qlora", tiny_models["llama"], small_dataset, copy_of,
                      trainer_kwargs={"peft_config": peft_config})
    with pytest.raises(QLoRAPluginError) as err:
        trainer.train()
    assert "trained with --lora_r 8; this run has --lora_r 4" in _one_line(err)
    config = json.loads((copy_of / "adapter_config.json").read_text())
    (copy_of / "adapter_config.json").write_text(json.dumps({**config, "r": 4}))
    with pytest.raises(QLoRAPluginError) as err:
        trainer.train()
    assert "holds an adapter that does not fit this run's (28 of 28 tensors differ; " in _one_line(err)
    assert re.search(r"lora_A.weight has shape \[8, \d+\], this model's \[4, \d+\]", str(err.value))
    assert trainer.state.global_step == 0


def test_a_truncated_adapter_is_refused(tiny_models, small_dataset, copy_of, no_loading):
    adapter = copy_of / "adapter_model.safetensors"
    size = adapter.stat().st_size
    assert safetensors_shapes(str(adapter))  # intact: accepted
    with open(adapter, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(QLoRAPluginError) as err:
        _resume("qlora", tiny_models["llama"], small_dataset, copy_of)
    assert (f"adapter_model.safetensors is not a complete safetensors file (truncated: {size - 100} of {size} "
            "bytes), so the checkpoint is damaged. Resume from an earlier checkpoint-N") in _one_line(err)
    adapter.write_bytes(b"\x00" * 5)
    with pytest.raises(QLoRAPluginError, match="shorter than a safetensors header"):
        _resume("qlora", tiny_models["llama"], small_dataset, copy_of)
    adapter.unlink()
    with pytest.raises(QLoRAPluginError, match="adapter_model.safetensors is missing beside its adapter_config.json"):
        _resume("qlora", tiny_models["llama"], small_dataset, copy_of)


@pytest.mark.parametrize("content", ["{not json", "[]", '{"global_step": "two"}', "\udcff"])
def test_a_garbage_trainer_state_is_refused(tiny_models, small_dataset, copy_of, no_loading, content):
    (copy_of / "trainer_state.json").write_bytes(content.encode("utf-8", "surrogateescape"))
    with pytest.raises(QLoRAPluginError) as err:
        _resume("qlora", tiny_models["llama"], small_dataset, copy_of)
    assert "trainer_state.json" in _one_line(err) and "the checkpoint is damaged" in str(err.value)


@pytest.mark.parametrize("missing", ["optimizer.pt", "scheduler.pt"])
def test_a_checkpoint_without_optimizer_state_is_refused_unless_accepted(tiny_models, small_dataset, copy_of,
                                                                         missing, caplog):
    (copy_of / missing).unlink()
    trainer = _resume("qlora", tiny_models["llama"], small_dataset, copy_of)
    with pytest.raises(QLoRAPluginError) as err:
        trainer.train()
    assert f"has no {missing}: the optimizer and the learning-rate schedule would start over" in _one_line(err)
    assert "--resume_without_optimizer true" in str(err.value) and trainer.state.global_step == 0
    accepted = _resume("qlora", tiny_models["llama"], small_dataset, copy_of,
                       options={"resume_without_optimizer": True})
    with caplog.at_level(logging.WARNING):
        accepted.train()
    assert f"has no {missing}" in caplog.text and "accepted by --resume_without_optimizer" in caplog.text
    assert accepted.state.global_step == STEPS + 1  # continued from step 2


class SignalDuringEvaluation(TrainerCallback):
    """Sends this process SIGTERM during the first evaluation, after a few batches, and counts the batches."""

    def __init__(self, after_batches):
        self.after, self.batches, self.sent_at = after_batches, 0, None

    def on_prediction_step(self, args, state, control, **kwargs):
        self.batches += 1
        if self.batches == self.after:
            self.sent_at = time.perf_counter()
            signal.raise_signal(signal.SIGTERM)


def test_sigterm_during_a_long_evaluation_stops_it_and_saves(tiny_models, small_dataset, tmp_path, capfd):
    from datasets import load_dataset

    from qlora_plugin import make_trainer

    eval_rows = load_dataset(str(DATA), split="train").select(range(400))  # 400 batches of 1
    signal_at = SignalDuringEvaluation(after_batches=3)
    args = _args(tmp_path, max_steps=6, save_strategy="no", eval_strategy="steps", eval_steps=2,
                 per_device_eval_batch_size=1)
    trainer = make_trainer("qlora", model=tiny_models["llama"], args=args, train_dataset=small_dataset,
                           eval_dataset=eval_rows, callbacks=[signal_at],
                           options={"lora_r": 8, "init_lora_weights": "default"})
    with pytest.raises(SystemExit) as stopped:
        trainer.train()
    seconds = time.perf_counter() - signal_at.sent_at
    print(f"\nSIGTERM at evaluation batch 3 of 400: exited {seconds:.2f} s later")
    assert stopped.value.code == 128 + signal.SIGTERM
    assert signal_at.batches == 3  # not the 400 of the whole evaluation
    assert trainer.state.global_step == 2  # not one more step
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith("checkpoint-")) == ["checkpoint-2"]
    checkpoint = tmp_path / "checkpoint-2"
    for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json",
                 "qlora_plugin_quantization.json"):
        assert (checkpoint / name).is_file(), name
    assert "stopped by SIGTERM at step 2" in capfd.readouterr().err
    report = json.loads((tmp_path / "qlora_plugin_report.json").read_text())  # as after a stop at a step end
    assert report["measured"]["steps"] == 2


def test_the_stop_messages_survive_a_closed_stderr():
    """The launcher or a `| tee` may be gone when the signal comes: writing the message must not raise (it did,
    BrokenPipeError, from the signal handler: the run died mid-evaluation without its checkpoint)."""
    from qlora_plugin.training.interruption import StopOnSignal

    read, write = os.pipe()
    os.close(read)
    saved = os.dup(2)
    os.dup2(write, 2)
    try:
        stop = StopOnSignal()
        stop.handle(signal.SIGTERM)  # no BrokenPipeError
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(write)
    assert stop.received == signal.SIGTERM


def test_a_sequence_to_sequence_model_is_refused_before_loading(small_dataset, tmp_path, monkeypatch):
    from transformers import T5Config

    from qlora_plugin.training import loading

    monkeypatch.setattr(loading, "_loading_now", lambda: pytest.fail("the model was loaded"))

    folder = tmp_path / "t5"
    T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, vocab_size=128,
             architectures=["T5ForConditionalGeneration"]).save_pretrained(folder)
    from qlora_plugin import make_trainer

    with pytest.raises(QLoRAPluginError) as err:
        make_trainer("qlora", model=str(folder), args=_args(tmp_path / "out"), train_dataset=small_dataset)
    text = _one_line(err)
    assert "sequence-to-sequence (encoder-decoder) model (T5ForConditionalGeneration, model_type 't5')" in text
    assert "Seq2SeqTrainer" in text


def test_a_masked_language_model_is_refused_before_loading(small_dataset, tmp_path, monkeypatch):
    from transformers import BertConfig

    from qlora_plugin import make_trainer
    from qlora_plugin.training import loading

    monkeypatch.setattr(loading, "_loading_now", lambda: pytest.fail("the model was loaded"))
    folder = tmp_path / "bert"
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=128,
               architectures=["BertForMaskedLM"]).save_pretrained(folder)
    with pytest.raises(QLoRAPluginError) as err:
        make_trainer("qlora", model=str(folder), args=_args(tmp_path / "out"), train_dataset=small_dataset)
    assert "is a masked (encoder-only) language model (BertForMaskedLM, model_type 'bert')" in _one_line(err)


def _sft(model, dataset_dir, out, *extra):
    return ["-m", "trl.scripts.sft", "--model_name_or_path", model, "--dataset_name", str(dataset_dir), "--strategy",
            "qlora", "--output_dir", str(out), "--per_device_train_batch_size", "2", "--max_length", "32",
            "--logging_steps", "1", "--report_to", "none", "--use_cpu", "--disable_tqdm", "true",
            "--init_lora_weights", "default", *extra]


@pytest.mark.slow
def test_through_trl_script_sigterm_in_evaluation_and_a_mismatched_resume(tiny_models, tmp_path):
    """TRL's own script: SIGTERM sent while a long evaluation runs stops within seconds with a checkpoint; resuming
    it with another --lora_r is one line, no traceback, a failed exit."""
    out, dataset_dir = tmp_path / "out", tmp_path / "data"
    dataset_dir.mkdir()
    rows = (DATA / "train.jsonl").read_text().splitlines(keepends=True)
    (dataset_dir / "train.jsonl").write_text("".join(rows[:32]))
    (dataset_dir / "test.jsonl").write_text("".join(rows[:2000]))  # 2000 evaluation batches of 1
    proc = start_python(_sft(tiny_models["llama"], dataset_dir, out, "--max_steps", "100", "--eval_strategy",
                             "steps", "--eval_steps", "2", "--per_device_eval_batch_size", "1", "--save_strategy",
                             "no", "--lora_r", "8"), tmp_path)
    watchdog = threading.Timer(300, proc.kill)
    watchdog.start()
    lines, sent = [], None
    for line in proc.stdout:
        lines.append(line)
        if sent is None and "'loss'" in line and "'epoch'" in line and len([x for x in lines if "'loss'" in x]) == 2:
            time.sleep(1.0)  # the evaluation at step 2 starts right after step 2's log line
            sent = time.perf_counter()
            proc.send_signal(signal.SIGTERM)
    code = proc.wait()
    watchdog.cancel()
    seconds = time.perf_counter() - sent
    output = "".join(lines)
    print(f"\nSIGTERM during evaluation: exit {code} {seconds:.1f} s later")
    assert code == 128 + signal.SIGTERM, output[-3000:]
    assert "Traceback" not in output and "stopped by SIGTERM at step 2" in output, output[-3000:]
    assert "eval_loss" not in output  # the evaluation did not finish
    assert seconds < 20, seconds
    assert sorted(e for e in os.listdir(out) if e.startswith("checkpoint-")) == ["checkpoint-2"]

    resumed = run_python(_sft(tiny_models["llama"], dataset_dir, out, "--max_steps", "4", "--lora_r", "16",
                              "--resume_from_checkpoint", "true"), tmp_path)
    # status 2: like every user error (the excepthook's; docs/troubleshooting.md)
    assert resumed.returncode == 2, resumed.stderr[-3000:]
    errors = [line for line in resumed.stderr.splitlines() if "error" in line.lower()]
    assert "Traceback" not in resumed.stderr
    assert errors == [f"qlora-plugin: error: --resume_from_checkpoint '{out / 'checkpoint-2'}' was trained with "
                      "--lora_r 8; this run has --lora_r 16. Resume with the settings the checkpoint was trained "
                      "with, or start a new run (a fresh --output_dir, no --resume_from_checkpoint)."]
