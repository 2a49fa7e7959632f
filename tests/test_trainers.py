"""`--strategy qlora` beyond SFT: TRL's DPO, KTO, reward, GRPO and RLOO trainers get the whole strategy, and any other
TRL trainer is refused before it reads a weight (issue 28).

The slow tests run TRL's own scripts (`trl dpo ...`) on a tiny model and small data made for them
(tests/data/trainers), and check from the outside: a hook file (`probe_hooks.py`, loaded with `--qlora_hooks`)
records what the running trainer holds: the optimizer's class, the 4-bit and LoRA layers, the adapters, every whole
model alive in the process; then the report, and the adapter loaded back with peft."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import REPO, run_command, run_python

from qlora_plugin.core.errors import QLoRAPluginError
from qlora_plugin.integration import activation, trl_patches
from qlora_plugin.core.options import StrategyOptions
from qlora_plugin.core.request import StrategyRequest
from qlora_plugin.ecosystem.runtime import Runtime
from qlora_plugin.strategies.recipe import METHOD_RECIPES, apply_training_defaults, training_defaults
from qlora_plugin.core.trainer_kinds import KINDS, kind_of_class
from qlora_plugin.training.trainer_setup import check_kind_options, options_for_kind

DATA = REPO / "tests" / "data" / "trainers"
FLAGS = ["--max_steps", "2", "--per_device_train_batch_size", "4", "--report_to", "none", "--use_cpu",
         "--logging_steps", "1", "--save_strategy", "no"]
LINEAR = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_trainer_kinds_are_trls_own_classes_and_user_subclasses():
    import trl
    from trl.experimental.orpo import ORPOTrainer

    for name, kind in KINDS.items():
        assert kind_of_class(getattr(trl, kind.class_name)) is kind
    assert kind_of_class(ORPOTrainer) is None
    assert kind_of_class(type("MyDPO", (trl.DPOTrainer,), {})) is KINDS["dpo"]  # a user's subclass is still DPO
    assert kind_of_class(type("Sub", (ORPOTrainer,), {})) is None


def test_unsupported_trainer_refused_before_it_reads_a_weight(capsys):
    from trl.experimental.orpo import ORPOTrainer

    activation.activate(StrategyRequest("qlora", {}, frozenset(), (), "cli"))
    with pytest.raises(SystemExit) as exit_info:
        ORPOTrainer(model="/no/such/model")  # reading it would fail with a different error
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not applied to ORPOTrainer" in err and "DPOTrainer (trl dpo)" in err
    activation.deactivate()
    with pytest.raises(Exception) as plain:  # without a strategy, TRL's own behaviour (it tries to load)
        ORPOTrainer(model="/no/such/model")
    assert not isinstance(plain.value, SystemExit)


def test_trl_commands_without_a_whole_strategy_refused_at_start():
    for argv in (["/usr/bin/trl", "distillation", "--model_name_or_path", "m"],
                 ["/x/site-packages/trl/scripts/distillation.py", "--output_dir", "o"]):
        with pytest.raises(QLoRAPluginError, match="not applied to `trl distillation`"):
            trl_patches.check_trl_command(argv, "qlora")
    for argv in (["/usr/bin/trl", "dpo"], ["/x/site-packages/trl/scripts/grpo.py"], ["/usr/bin/trl", "env"],
                 ["my_script.py", "distillation"]):
        trl_patches.check_trl_command(argv, "qlora")


def test_a_recipe_per_trainer_and_explicit_settings_win():
    from trl import DPOConfig, GRPOConfig

    cpu = Runtime("cpu", False, "none")
    for kind in ("dpo", "kto", "reward", "grpo", "rloo"):
        recipe = training_defaults(10**9, cpu, kind)
        assert recipe["optim"] == "paged_adamw_32bit" and recipe["activation_checkpointing"] is True
        assert recipe["learning_rate"] == METHOD_RECIPES[kind]["learning_rate"]
    assert training_defaults(10**9, cpu, "sft")["learning_rate"] == 2e-4  # the paper's, unchanged

    args = DPOConfig("out", beta=0.3, report_to="none", use_cpu=True)
    applied = apply_training_defaults(args, training_defaults(10**9, cpu, "dpo"), {"beta"})
    assert args.beta == 0.3 and "beta" not in applied  # yours
    assert args.learning_rate == 5e-6 and str(args.lr_scheduler_type.value) == "cosine"  # the handbook's
    grpo = GRPOConfig("out", report_to="none", use_cpu=True)
    apply_training_defaults(grpo, training_defaults(10**9, cpu, "grpo"), set())
    assert grpo.max_grad_norm == 0.1 and grpo.adam_beta2 == 0.99


def test_options_each_trainer_needs():
    options = StrategyOptions()
    reward = options_for_kind(options, KINDS["reward"], {})
    assert reward.lora_task_type == "SEQ_CLS" and reward.init_lora_weights == "auto"  # calibrated on its batches
    assert options_for_kind(options, KINDS["sft"], {}) is options  # the SFT path unchanged
    assert options_for_kind(options, KINDS["dpo"], {}).init_lora_weights == "default"
    for kind in KINDS.values():
        check_kind_options(options_for_kind(options, kind, {}), kind)  # the defaults fit every trainer


def test_reward_model_needs_a_classification_adapter():
    with pytest.raises(QLoRAPluginError, match="lora_task_type CAUSAL_LM` contradicts RewardTrainer"):
        check_kind_options(options_for_kind(StrategyOptions(), KINDS["reward"], {"lora_task_type": "CAUSAL_LM"}),
                           KINDS["reward"])


def test_calibrated_loftq_is_refused_where_the_start_is_the_reference():
    for kind in ("dpo", "kto", "grpo", "rloo"):
        with pytest.raises(QLoRAPluginError, match=f"loftq_calibrated` cannot run under {KINDS[kind].class_name}"):
            check_kind_options(StrategyOptions(init_lora_weights="loftq_calibrated"), KINDS[kind])
    check_kind_options(StrategyOptions(init_lora_weights="loftq_calibrated", lora_task_type="SEQ_CLS"),
                       KINDS["reward"])


def test_memory_budget_refused_for_generating_trainers():
    with pytest.raises(QLoRAPluginError, match="cannot size GRPOTrainer's batches"):
        check_kind_options(StrategyOptions(memory_budget="8GiB"), KINDS["grpo"])


def _train(kind: str, model: str, tmp_path: Path, data: str, *extra: str) -> tuple[dict, dict, Path]:
    out = tmp_path / "out"
    shutil.copy(DATA / "short_reward.py", tmp_path)
    proc = run_command(["trl", kind, "--model_name_or_path", model, "--dataset_name", str(DATA / data),
                        "--output_dir", str(out), *FLAGS, *extra, "--strategy", "qlora",
                        "--qlora_hooks", str(DATA / "probe_hooks.py")],
                       cwd=tmp_path, env_extra={"PROBE_DIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"trainer    : {KINDS[kind].class_name} (trl {kind})" in proc.stdout
    probe = json.loads((tmp_path / "probe.json").read_text())
    report = json.loads((out / "qlora_plugin_report.json").read_text())
    assert probe["trainer_kind"] == report["trainer_kind"] == kind  # visible to hooks
    assert "PagedAdamW32bit" in probe["optimizer_classes"] and report["optimizer"]["class"] == "PagedAdamW32bit"
    assert probe["layers_4bit"] == report["quantization"]["layers_4bit"] == 14  # 2 blocks x 7 linear layers
    assert report["quantization"]["quant_type"] == "nf4" and report["quantization"]["double_quant"]
    assert probe["lora_layers"] == LINEAR  # every linear layer of the blocks
    assert probe["adapters"] == ["default"]  # no second (reference) adapter
    assert len(probe["models_in_memory"]) == 1, probe["models_in_memory"]  # no second copy of the model
    assert probe["gradient_checkpointing"] is True
    assert report["measured"]["steps"] == 2
    return probe, report, out


def _load_adapter(model: str, out: Path, classifier: bool = False) -> None:
    """The saved adapter loads onto its base with peft, as a user would load it."""
    code = (
        "import sys, torch, transformers; from peft import PeftModel\n"
        f"cls = transformers.{'AutoModelForSequenceClassification' if classifier else 'AutoModelForCausalLM'}\n"
        f"base = cls.from_pretrained(sys.argv[1]{', num_labels=1' if classifier else ''})\n"
        "model = PeftModel.from_pretrained(base, sys.argv[2])\n"
        "ids = torch.tensor([[1, 2, 3, 4]])\n"
        "print('OUT', tuple(model(input_ids=ids).logits.shape))\n"
    )
    proc = run_python(["-c", code, model, str(out)], cwd=out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("OUT (1, 1)" if classifier else "OUT (1, 4,") in proc.stdout


@pytest.mark.slow
def test_trl_dpo(tiny_models, tmp_path):
    probe, report, out = _train("dpo", tiny_models["llama"], tmp_path, "preference", "--max_length", "64")
    assert probe["beta"] == 0.01 and probe["learning_rate"] == 5e-6  # alignment-handbook's QLoRA DPO recipe
    assert report["reference"].startswith("the same base with the adapter disabled")
    assert "rewards/margins" in probe["logged"]
    assert not (out / "ref").exists()
    _load_adapter(tiny_models["llama"], out)


@pytest.mark.slow
def test_trl_dpo_explicit_beta_wins(tiny_models, tmp_path):
    probe, report, _ = _train("dpo", tiny_models["llama"], tmp_path, "preference", "--max_length", "64",
                              "--beta", "0.2")
    assert probe["beta"] == 0.2 and "beta" in report["user_kept"] and "beta" not in report["recipe_applied"]


@pytest.mark.slow
def test_trl_reward(tiny_models, tmp_path):
    probe, report, out = _train("reward", tiny_models["llama"], tmp_path, "preference", "--max_length", "64")
    assert probe["task_type"] == "SEQ_CLS"
    assert any(name.startswith("base_model.model.score.modules_to_save") for name in probe["trainable"])
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "score" in config["modules_to_save"]
    assert report["reference"] is None and probe["learning_rate"] == 1e-4
    _load_adapter(tiny_models["llama"], out, classifier=True)

    merged = tmp_path / "merged"  # `qlora-plugin merge` writes a classifier that scores like the adapter
    proc = run_command(["qlora-plugin", "merge", "--adapter", str(out), "--out", str(merged)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((merged / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and len(config["id2label"]) == 1
    check = json.loads((merged / "merge_report.json").read_text())
    assert check["passed"] and check["merge"]["max_relative_logit_diff"] < 1e-3
    code = ("import sys, torch; from safetensors.torch import load_file; from transformers import "
            "AutoModelForSequenceClassification as C\n"
            "model = C.from_pretrained(sys.argv[1])\n"
            "head = load_file(sys.argv[2] + '/adapter_model.safetensors')\n"
            "saved = [v for k, v in head.items() if k.endswith('score.modules_to_save.default.weight')"
            " or k.endswith('score.weight')][0]\n"
            "assert torch.equal(model.score.weight.float(), saved.float())\n"
            "assert not any('lm_head' in n for n, _ in model.named_parameters())\n"
            "print('SCORE', tuple(model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape))\n")
    proc = run_python(["-c", code, str(merged), str(out)], cwd=tmp_path)
    assert proc.returncode == 0 and "SCORE (1, 1)" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.slow
def test_trl_kto(tiny_models, tmp_path):
    probe, report, out = _train("kto", tiny_models["llama"], tmp_path, "unpaired", "--max_length", "64")
    assert report["reference"].startswith("the same base with the adapter disabled")
    assert probe["learning_rate"] == 5e-7
    _load_adapter(tiny_models["llama"], out)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_trl_grpo_and_rloo_generate_with_the_4bit_policy(kind, tiny_models, tmp_path):
    probe, report, out = _train(kind, tiny_models["llama"], tmp_path, "prompts", "--reward_funcs",
                                "short_reward.short", "--num_generations", "2", "--max_completion_length", "8",
                                "--beta", "0.05")
    assert "reward" in probe["logged"]  # completions were generated and scored
    assert report["reference"].startswith("the same base with the adapter disabled")  # beta > 0: a KL term
    assert probe["beta"] == 0.05 and probe["learning_rate"] == 5e-6
    _load_adapter(tiny_models["llama"], out)


@pytest.mark.slow
def test_reward_script_that_loads_its_classifier_itself(tiny_models, tmp_path):
    out = tmp_path / "out"
    proc = run_python([str(REPO / "tests" / "scripts" / "own_loading_reward.py"), "--model_name_or_path",
                       tiny_models["llama"], "--dataset_name", str(DATA / "preference"), "--output_dir", str(out),
                       "--max_length", "64", *FLAGS, "--strategy", "qlora",
                       "--qlora_hooks", str(DATA / "probe_hooks.py")],
                      cwd=tmp_path, env_extra={"PROBE_DIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "loaded by  : strategy, in the script's from_pretrained" in proc.stdout
    probe = json.loads((tmp_path / "probe.json").read_text())
    assert probe["layers_4bit"] == 14 and probe["task_type"] == "SEQ_CLS"
    assert probe["models_in_memory"] == ["LlamaForSequenceClassification"]
    _load_adapter(tiny_models["llama"], out, classifier=True)


@pytest.mark.slow
def test_trl_dpo_resumes_from_its_checkpoint(tiny_models, tmp_path):
    out = tmp_path / "out"
    flags = ["trl", "dpo", "--model_name_or_path", tiny_models["llama"], "--dataset_name", str(DATA / "preference"),
             "--output_dir", str(out), "--max_length", "64", *FLAGS[2:-2], "--save_strategy", "steps",
             "--save_steps", "1", "--strategy", "qlora"]
    first = run_command([*flags, "--max_steps", "2"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    again = run_command([*flags, "--max_steps", "3", "--resume_from_checkpoint", str(out / "checkpoint-2")],
                        cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stdout + again.stderr
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and [e["step"] for e in state["log_history"] if "loss" in e][-1] == 3
