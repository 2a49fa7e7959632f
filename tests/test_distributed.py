"""Distributed engines through accelerate: DDP end to end on two CPU processes (gloo), and the settings the
strategy produces under FSDP and DeepSpeed ZeRO-3 (those need GPUs; here their settings are unit-tested)."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import REPO, TRAIN_FLAGS, run_command

from qlora_plugin.core.options import StrategyOptions
from qlora_plugin.ecosystem.runtime import Runtime

RANK_PROBE = '''
import hashlib, json, os
from transformers import TrainerCallback
from qlora_plugin import hookimpl


def _adapter_digest(model):
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        if param.requires_grad:
            digest.update(param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


class RankProbe(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = _adapter_digest(model)
        self.batches = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.batches += 1

    def on_train_end(self, args, state, control, model=None, **kwargs):
        rank = int(os.environ.get("RANK", "0"))
        with open(os.path.join(os.environ["PROBE_DIR"], f"rank{rank}.json"), "w") as f:
            json.dump({"step": state.global_step, "batches": self.batches, "before": self.before,
                       "after": _adapter_digest(model), "world": int(os.environ.get("WORLD_SIZE", "1"))}, f)


@hookimpl
def qlora_trainer_callbacks(training_args):
    return [RankProbe()]
'''


@pytest.mark.slow
def test_ddp_two_cpu_processes_every_rank_trains(tiny_models, dataset_dir, tmp_path):
    hook = tmp_path / "rank_probe.py"
    hook.write_text(RANK_PROBE)
    out = tmp_path / "run"
    result = run_command(
        ["accelerate", "launch", "--config_file", str(REPO / "examples" / "accelerate" / "ddp.yaml"),
         "-m", "trl.scripts.sft", "--model_name_or_path", tiny_models["llama"], "--dataset_name", dataset_dir,
         "--strategy", "qlora", "--qlora_hooks", str(hook), *TRAIN_FLAGS, "--output_dir", str(out)],
        cwd=tmp_path, env_extra={"PROBE_DIR": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for probe in ranks:
        assert probe["world"] == 2 and probe["step"] == 3 and probe["batches"] == 3
        assert probe["after"] != probe["before"]  # this rank's adapter moved
    assert ranks[0]["after"] == ranks[1]["after"]  # gradients were all-reduced: the replicas agree
    report = json.loads((out / "qlora_plugin_report.json").read_text())
    assert report["runtime"]["engine"] == "ddp" and report["runtime"]["processes"] == 2
    assert report["quantization"]["layers_4bit"] > 0


SIGNAL_ONE_RANK = '''
import json, os, signal
from transformers import TrainerCallback
from qlora_plugin import hookimpl


class SignalRankOne(TrainerCallback):
    """SIGTERM to rank 1 only, while it runs step 3; every rank records the step it stopped at."""

    def on_step_begin(self, args, state, control, **kwargs):
        if int(os.environ["RANK"]) == 1 and state.global_step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_train_end(self, args, state, control, **kwargs):
        with open(os.path.join(os.environ["PROBE_DIR"], f"stopped{os.environ['RANK']}.json"), "w") as f:
            json.dump({"step": state.global_step}, f)


@hookimpl
def qlora_trainer_callbacks(training_args):
    return [SignalRankOne()]
'''


def _launch_ddp(argv, cwd, env_extra, timeout=300):
    """`accelerate launch` with the DDP config; a hang kills the launcher and every rank (the ranks run in their
    own sessions, so the launcher's process group does not reach them), then fails."""
    import subprocess
    import sys

    import psutil

    from conftest import _env

    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
               str(REPO / "examples" / "accelerate" / "ddp.yaml"), "-m", "trl.scripts.sft", *argv]
    proc = subprocess.Popen(command, cwd=cwd, env=_env(env_extra), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        launcher = psutil.Process(proc.pid)
        for process in [*launcher.children(recursive=True), launcher]:
            process.kill()
        output, _ = proc.communicate()
        pytest.fail(f"the ranks hung (killed after {timeout} s):\n{output[-4000:]}")
    return proc.returncode, output


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tiny_models, dataset_dir, tmp_path):
    """Both ranks stop after the step during which rank 1 got SIGTERM, save one whole checkpoint together (no
    hang: without the agreement rank 1 waits in the checkpoint's barrier while rank 0 runs the next step), and
    the run resumes from it."""
    hook = tmp_path / "signal_one_rank.py"
    hook.write_text(SIGNAL_ONE_RANK)
    out, data = tmp_path / "run", tmp_path / "data"
    data.mkdir()  # 64 rows: each rank tokenizes it, twice
    rows = (Path(dataset_dir) / "train.jsonl").read_text().splitlines(keepends=True)[:64]
    (data / "train.jsonl").write_text("".join(rows))
    flags = ["--model_name_or_path", tiny_models["llama"], "--dataset_name", str(data), "--strategy", "qlora",
             "--per_device_train_batch_size", "2", "--max_length", "32", "--report_to", "none", "--use_cpu",
             "--logging_steps", "1", "--save_strategy", "no", "--disable_tqdm", "true", "--output_dir", str(out)]
    code, output = _launch_ddp([*flags, "--qlora_hooks", str(hook), "--max_steps", "6"], tmp_path,
                               {"PROBE_DIR": str(tmp_path)})
    assert code != 0, output[-3000:]  # the job did not finish: a scheduler can requeue it
    assert [json.loads((tmp_path / f"stopped{r}.json").read_text())["step"] for r in (0, 1)] == [3, 3]
    assert "stopped by SIGTERM at step 3" in output, output[-3000:]
    assert sorted(e.name for e in out.iterdir() if "checkpoint" in e.name) == ["checkpoint-3"]
    assert {"adapter_model.safetensors", "optimizer.pt", "trainer_state.json"} <= set(os.listdir(out / "checkpoint-3"))

    code, output = _launch_ddp([*flags, "--max_steps", "5", "--resume_from_checkpoint", "true"], tmp_path, {})
    assert code == 0, output[-3000:]
    assert json.loads((out / "qlora_plugin_report.json").read_text())["measured"]["steps"] == 5


SIGNAL_ONE_RANK_IN_EVALUATION = '''
import json, os, signal
from transformers import TrainerCallback
from qlora_plugin import hookimpl


class SignalRankOneInEvaluation(TrainerCallback):
    """SIGTERM to rank 1 only, at its third evaluation batch; every rank records its batches and the step saved."""

    batches = 0

    def on_prediction_step(self, args, state, control, **kwargs):
        self.batches += 1
        if int(os.environ["RANK"]) == 1 and self.batches == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_save(self, args, state, control, **kwargs):
        with open(os.path.join(os.environ["PROBE_DIR"], f"saved{os.environ['RANK']}.json"), "w") as f:
            json.dump({"step": state.global_step, "batches": self.batches}, f)


@hookimpl
def qlora_trainer_callbacks(training_args):
    return [SignalRankOneInEvaluation()]
'''


@pytest.mark.slow
def test_a_signal_to_one_rank_during_evaluation_stops_every_rank_at_the_same_batch(tiny_models, dataset_dir,
                                                                                   tmp_path):
    """Both ranks abandon the evaluation after the batch during which rank 1 got SIGTERM (of 100 per rank), save
    the step's checkpoint together and exit: the ranks agree after every evaluation batch, as after every step."""
    hook = tmp_path / "signal_in_evaluation.py"
    hook.write_text(SIGNAL_ONE_RANK_IN_EVALUATION)
    out, data = tmp_path / "run", tmp_path / "data"
    data.mkdir()
    rows = (Path(dataset_dir) / "train.jsonl").read_text().splitlines(keepends=True)
    (data / "train.jsonl").write_text("".join(rows[:32]))
    (data / "test.jsonl").write_text("".join(rows[:200]))  # 100 evaluation batches of 1 per rank
    flags = ["--model_name_or_path", tiny_models["llama"], "--dataset_name", str(data), "--strategy", "qlora",
             "--per_device_train_batch_size", "2", "--max_length", "32", "--report_to", "none", "--use_cpu",
             "--logging_steps", "1", "--save_strategy", "no", "--disable_tqdm", "true", "--output_dir", str(out),
             "--eval_strategy", "steps", "--eval_steps", "2", "--per_device_eval_batch_size", "1",
             "--qlora_hooks", str(hook), "--max_steps", "6"]
    code, output = _launch_ddp(flags, tmp_path, {"PROBE_DIR": str(tmp_path)})
    assert code != 0, output[-3000:]
    assert [json.loads((tmp_path / f"saved{r}.json").read_text()) for r in (0, 1)] == [{"step": 2, "batches": 3}] * 2
    assert "stopped by SIGTERM at step 2" in output and "eval_loss" not in output, output[-3000:]
    assert sorted(e.name for e in out.iterdir() if "checkpoint" in e.name) == ["checkpoint-2"]


GPU = dict(device_type="cuda", bf16_native=True)


@pytest.mark.parametrize(
    "engine, storage, device_map, reentrant",
    [
        ("none", torch.uint8, "unset", False),
        ("ddp", torch.uint8, {"": 1}, False),
        ("fsdp", torch.bfloat16, None, False),
        ("deepspeed_zero3", torch.bfloat16, None, True),
    ],
)
def test_engine_settings(engine, storage, device_map, reentrant):
    from qlora_plugin.quant.config import model_init_kwargs
    from qlora_plugin.strategies.recipe import training_defaults

    runtime = Runtime(**GPU, engine=engine, process_index=1, num_processes=1 if engine == "none" else 2, device_index=1)
    kwargs = model_init_kwargs(StrategyOptions(), {}, runtime)
    config = kwargs["quantization_config"]
    assert kwargs["dtype"] == torch.bfloat16 and config.bnb_4bit_compute_dtype == torch.bfloat16
    assert config.bnb_4bit_quant_storage == storage  # FSDP/ZeRO-3 flatten it with the bf16 parameters
    assert kwargs.get("device_map", "unset") == device_map  # never "auto" under DDP: one full copy per rank
    defaults = training_defaults(10**9, runtime)
    assert defaults["activation_checkpointing_kwargs"] == {"use_reentrant": reentrant}
    assert defaults["bf16"] is True


@pytest.mark.parametrize("engine, upcast", [("none", True), ("fsdp", False), ("deepspeed_zero3", False)])
def test_no_fp32_upcast_under_sharding_engines(tiny_models, engine, upcast):
    from transformers import AutoModelForCausalLM

    from qlora_plugin.strategies.adapters import wrap_with_lora
    from qlora_plugin.quant.config import model_init_kwargs

    runtime = Runtime("cpu", bf16_native=True, engine=engine)
    options = StrategyOptions(bnb_4bit_compute_dtype="bfloat16")
    kwargs = model_init_kwargs(options, {"dtype": "bfloat16"}, runtime)
    model = wrap_with_lora(AutoModelForCausalLM.from_pretrained(tiny_models["llama"], **kwargs), options, runtime)
    frozen_float = {p.dtype for n, p in model.named_parameters() if not p.requires_grad and p.is_floating_point()}
    assert (torch.float32 in frozen_float) == upcast  # peft's k-bit preparation upcasts norms/embeddings to fp32


def test_runtime_detection_reads_accelerate_state(monkeypatch):
    import accelerate
    from accelerate.utils import DistributedType

    from qlora_plugin.ecosystem import runtime as runtime_module

    class FakeState:
        device = torch.device("cpu")
        local_process_index = 1
        num_processes = 2

    for dist, engine in ((DistributedType.MULTI_CPU, "ddp"), (DistributedType.FSDP, "fsdp"),
                         (DistributedType.NO, "none")):
        state = FakeState()
        state.distributed_type = dist
        state.num_processes = 1 if dist == DistributedType.NO else 2
        monkeypatch.setattr(accelerate, "PartialState", lambda s=state: s)
        detected = runtime_module.detect_runtime()
        assert detected.engine == engine and detected.process_index == 1


@pytest.mark.parametrize("name, distributed_type", [("ddp", "MULTI_GPU"), ("fsdp_qlora", "FSDP"),
                                                     ("deepspeed_zero3_qlora", "DEEPSPEED")])
def test_shipped_accelerate_configs(name, distributed_type):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / "examples" / "accelerate" / f"{name}.yaml"))
    assert config.distributed_type.value == distributed_type
    if name == "fsdp_qlora":
        fsdp = config.fsdp_config
        assert fsdp["fsdp_cpu_ram_efficient_loading"] and fsdp["fsdp_sync_module_states"]
        assert fsdp["fsdp_use_orig_params"] is False
    if name == "deepspeed_zero3_qlora":
        assert config.deepspeed_config["zero_stage"] == 3 and config.deepspeed_config["zero3_init_flag"]


def test_launcher_settings_that_break_qlora_are_named(monkeypatch):
    from qlora_plugin.strategies.engine_checks import engine_warnings

    fsdp = Runtime(**GPU, engine="fsdp", num_processes=2)
    monkeypatch.setenv("FSDP_USE_ORIG_PARAMS", "true")
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")
    found = engine_warnings(fsdp, "paged_adamw_8bit")
    assert len(found) == 3 and any("fsdp_use_orig_params: false" in f for f in found)
    monkeypatch.setenv("FSDP_USE_ORIG_PARAMS", "false")
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")
    assert engine_warnings(fsdp, "paged_adamw_32bit") == []
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO3_INIT", "false")
    assert engine_warnings(Runtime(**GPU, engine="deepspeed_zero3"), "paged_adamw_32bit")
    assert engine_warnings(Runtime(**GPU, engine="ddp"), "paged_adamw_8bit") == []


@pytest.mark.slow
def test_fsdp_final_save_writes_the_adapter_with_a_sharded_state_dict(tiny_models, dataset_dir, tmp_path,
                                                                        monkeypatch):
    """FSDP needs an accelerator, so it is faked on the trainer object: its plugin says SHARDED_STATE_DICT (the
    shipped fsdp_qlora.yaml) and `FSDP.state_dict_type` records the gather it is asked for. transformers' own
    `save_model` writes nothing then (trainer.py: only FULL_STATE_DICT is saved); the strategy's final save
    writes the adapter, gathering a full state dict, without CPU offload for one process (FSDP refuses it)."""
    import contextlib
    from types import SimpleNamespace

    from datasets import load_dataset
    from safetensors.torch import load_file
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import StateDictType
    from transformers import Trainer
    from trl import SFTConfig

    from qlora_plugin import make_trainer

    args = SFTConfig(output_dir=str(tmp_path / "run"), use_cpu=True, report_to="none", max_length=32)
    trainer = make_trainer("qlora", model=tiny_models["llama"], args=args,
                           train_dataset=load_dataset(dataset_dir, split="train").select(range(8)))
    gathered = []

    @contextlib.contextmanager
    def state_dict_type(module, kind, config=None, optim_config=None):
        gathered.append((kind, config.offload_to_cpu, config.rank0_only))
        yield

    monkeypatch.setattr(FSDP, "state_dict_type", staticmethod(state_dict_type))
    plugin = SimpleNamespace(state_dict_type=StateDictType.SHARDED_STATE_DICT, fsdp_version=1)
    monkeypatch.setattr(trainer.accelerator.state, "fsdp_plugin", plugin, raising=False)
    monkeypatch.setattr(trainer, "is_fsdp_enabled", True)

    own_save = vars(Trainer)["save_model"]  # transformers' own, under the class wrapper an earlier test may have set
    getattr(own_save, "__wrapped__", own_save)(trainer, str(tmp_path / "transformers"))  # transformers alone
    assert not (tmp_path / "transformers" / "adapter_model.safetensors").exists()
    trainer.save_model(str(tmp_path / "final"))
    adapter = load_file(str(tmp_path / "final" / "adapter_model.safetensors"))
    assert adapter and all("lora_" in key for key in adapter)
    assert gathered == [(StateDictType.FULL_STATE_DICT, False, False)]


def test_the_quantization_record_is_read_from_the_layer_when_fsdp_flattened_the_weight(tiny_models):
    """Under FSDP with `use_orig_params: false` a 4-bit layer's weight is a plain view into the flat parameter at
    save time, without `quant_state`; the record (and the summary's facts) read the layer's own copy."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qlora_plugin.quant.layers import four_bit_layers, quantization_facts
    from qlora_plugin.quant.record import quantization_record

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32,
                                                 quantization_config=BitsAndBytesConfig(
                                                     load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True))
    expected = quantization_record(model)
    for layer in four_bit_layers(model):
        assert layer.quant_state is layer.weight.quant_state  # the copy bitsandbytes keeps on the layer
        layer.weight = torch.nn.Parameter(layer.weight.data.view(-1, 1).clone(), requires_grad=False)  # FSDP's view
        assert getattr(layer.weight, "quant_state", None) is None
    assert quantization_record(model) == expected and expected["bnb_4bit_use_double_quant"] is True
    assert quantization_facts(model)["quant_type"] == expected["bnb_4bit_quant_type"] == "nf4"
