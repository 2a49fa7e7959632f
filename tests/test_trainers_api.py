"""The Python API for TRL's other trainers (issue 28): `make_trainer(trainer=DPOTrainer, ...)` applies the same
pipeline as `trl dpo --strategy qlora`; unsupported classes are refused with the CLI's message. In-process, tiny
models."""

from __future__ import annotations

import json

import pytest
from datasets import load_dataset

from conftest import REPO

from qlora_plugin.core.errors import QLoRAPluginError

DATA = REPO / "tests" / "data" / "trainers"
LINEAR = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def _dpo(tiny_models, tmp_path, **overrides):
    from trl import DPOConfig, DPOTrainer

    from qlora_plugin import make_trainer

    args = DPOConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to="none",
                     use_cpu=True, logging_steps=1, save_strategy="no", max_length=64, **overrides)
    return make_trainer("qlora", trainer=DPOTrainer, model=tiny_models["llama"], args=args,
                        train_dataset=load_dataset(str(DATA / "preference"))["train"])


def test_make_trainer_applies_the_whole_strategy_to_dpo(tiny_models, tmp_path):
    trainer = _dpo(tiny_models, tmp_path)
    model = trainer.model
    assert type(trainer).__name__ == "DPOTrainer" and getattr(model, "is_loaded_in_4bit", False)
    assert sum(type(m).__module__.startswith("bitsandbytes") and type(m).__name__ == "Linear4bit"
               for m in model.modules()) == 14
    assert sorted({n.split(".")[-2] for n, _ in model.named_modules() if n.endswith(".lora_A")}) == LINEAR
    assert sorted(model.peft_config) == ["default"]  # TRL's `ref` copy removed: the reference is the disabled adapter
    assert trainer.optimizer_cls_and_kwargs[0].__name__ == "PagedAdamW32bit"  # DPOTrainer takes no such argument
    assert trainer.args.beta == 0.01 and trainer.args.learning_rate == 5e-6  # the handbook's QLoRA DPO recipe
    assert trainer.create_optimizer().__class__.__name__ == "PagedAdamW32bit"


def test_make_trainer_keeps_your_settings_under_dpo(tiny_models, tmp_path):
    trainer = _dpo(tiny_models, tmp_path, beta=0.2)
    assert trainer.args.beta == 0.2


def test_unsupported_trainer_class_refused_with_the_clis_message(tmp_path):
    from trl.experimental.orpo import ORPOTrainer

    from qlora_plugin import apply_strategy, make_trainer
    from qlora_plugin.integration.trl_patches import unsupported_trainer_message

    with pytest.raises(QLoRAPluginError) as refused:
        make_trainer("qlora", trainer=ORPOTrainer, model="/no/such/model")  # refused before it is read
    assert str(refused.value) == unsupported_trainer_message("ORPOTrainer", "qlora")
    with pytest.raises(QLoRAPluginError, match="must be a TRL trainer class"):
        make_trainer("qlora", trainer="dpo", model="/no/such/model")
    from trl import DPOTrainer

    with pytest.raises(QLoRAPluginError, match=r"Use make_trainer\('qlora', trainer=DPOTrainer"):
        apply_strategy({"model": "/no/such/model"}, "qlora", trainer=DPOTrainer)


@pytest.mark.slow
def test_make_trainer_trains_a_reward_model_and_writes_the_report(tiny_models, tmp_path):
    from trl import RewardConfig, RewardTrainer

    from qlora_plugin import make_trainer

    args = RewardConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to="none",
                        use_cpu=True, logging_steps=1, save_strategy="no", max_length=64)
    trainer = make_trainer("qlora", trainer=RewardTrainer, model=tiny_models["llama"], args=args,
                           train_dataset=load_dataset(str(DATA / "preference"))["train"])
    assert str(trainer.model.peft_config["default"].task_type) == "SEQ_CLS"
    trainer.train()
    report = json.loads((tmp_path / "qlora_plugin_report.json").read_text())
    assert report["trainer_kind"] == "reward" and report["source"] == "api"
    assert report["optimizer"]["class"] == "PagedAdamW32bit"
    assert report["memory"]["predicted_peak_bytes"] > 0  # the plan counts the reward model's rows
    # the calibrated start, fed by the reward collator's chosen and rejected rows
    assert report["adapter"]["init"]["method"] == "loftq_calibrated" and report["adapter"]["init"]["tokens"] > 0


@pytest.mark.slow
def test_handbook_dpo_script_that_loads_its_own_model(tiny_models, tmp_path):
    """The alignment handbook's DPO shape with `--strategy qlora` appended: the strategy is applied whole."""
    from conftest import run_python

    out = tmp_path / "out"
    proc = run_python([str(REPO / "tests" / "scripts" / "handbook_dpo.py"), "--model_name_or_path",
                       tiny_models["llama"], "--dataset_name", str(DATA / "preference"), "--output_dir", str(out),
                       "--max_length", "64", "--max_steps", "2", "--per_device_train_batch_size", "4",
                       "--report_to", "none", "--use_cpu", "--logging_steps", "1", "--save_strategy", "no",
                       "--strategy", "qlora", "--qlora_hooks", str(DATA / "probe_hooks.py")],
                      cwd=tmp_path, env_extra={"PROBE_DIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "loaded by  : strategy, in the script's from_pretrained" in proc.stdout
    assert "trainer    : DPOTrainer (trl dpo)" in proc.stdout
    probe = json.loads((tmp_path / "probe.json").read_text())
    assert probe["layers_4bit"] == 14 and probe["lora_layers"] == LINEAR
    assert "PagedAdamW32bit" in probe["optimizer_classes"]
    assert probe["adapters"] == ["default"] and probe["models_in_memory"] == ["LlamaForCausalLM"]
    report = json.loads((out / "qlora_plugin_report.json").read_text())
    assert report["trainer_kind"] == "dpo" and report["quantization"]["quant_type"] == "nf4"
    assert report["quantization"]["double_quant"] and report["optimizer"]["class"] == "PagedAdamW32bit"
    assert report["reference"].startswith("the same base with the adapter disabled")
    assert report["memory"]["predicted_peak_bytes"] > 0  # the plan counts DPO's rows and reference pass
    assert (out / "adapter_model.safetensors").exists()


def test_memory_budget_sizes_a_dpo_run(tiny_models, tmp_path):
    from trl import DPOConfig, DPOTrainer

    from qlora_plugin import make_trainer
    from qlora_plugin.training.report import StrategyReportCallback

    args = DPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_length=64, max_steps=1)
    trainer = make_trainer("qlora", trainer=DPOTrainer, options={"memory_budget": "64GiB"}, model=tiny_models["llama"],
                           args=args, train_dataset=load_dataset(str(DATA / "preference"))["train"])
    facts = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, StrategyReportCallback)).facts
    budget = facts["memory_budget"]
    assert budget["per_device_train_batch_size"] * budget["gradient_accumulation_steps"] == 8  # TRL's default kept
    assert trainer.args.per_device_train_batch_size == budget["per_device_train_batch_size"]
    assert facts["memory"]["predicted_for"]["batch_size"] == budget["per_device_train_batch_size"]
    with pytest.raises(QLoRAPluginError, match="Nothing fits the memory budget of 1.00 MiB"):
        make_trainer("qlora", trainer=DPOTrainer, options={"memory_budget": "1MiB"}, model=tiny_models["llama"],
                     args=DPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_length=64),
                     train_dataset=load_dataset(str(DATA / "preference"))["train"])
