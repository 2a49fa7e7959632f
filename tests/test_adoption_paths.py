"""Every way of switching the strategy on, end to end in fresh processes: the unmodified TRL script, the TRL
CLI, a YAML config, environment variables, a user's own scripts, and the opt-out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TRAIN_FLAGS, run_command, run_python

SCRIPTS = REPO / "tests" / "scripts"


def report(out_dir) -> dict:
    return json.loads((Path(out_dir) / "qlora_plugin_report.json").read_text())


def assert_qlora_run(proc, out_dir, source):
    assert proc.returncode == 0, proc.stderr[-3000:]
    facts = report(out_dir)
    assert facts["strategy"] == "qlora" and facts["source"] == source
    assert facts["quantization"]["quant_type"] == "nf4" and facts["quantization"]["double_quant"] is True
    assert facts["quantization"]["layers_4bit"] > 0
    assert facts["measured"]["steps"] == 3
    assert (Path(out_dir) / "adapter_model.safetensors").is_file()
    assert "[qlora-plugin] strategy qlora" in proc.stdout
    return facts


@pytest.mark.slow
@pytest.mark.floor
def test_unmodified_trl_script_module(tiny_models, dataset_dir, tmp_path):
    out = tmp_path / "out"
    proc = run_python(["-m", "trl.scripts.sft", "--model_name_or_path", tiny_models["llama"], "--dataset_name",
                       dataset_dir, "--output_dir", str(out), "--strategy", "qlora", *TRAIN_FLAGS], tmp_path)
    facts = assert_qlora_run(proc, out, "cli")
    assert facts["adapter"]["r"] == 64 and facts["adapter"]["alpha"] == 16
    assert facts["adapter"]["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                                  "up_proj", "v_proj"]
    assert facts["recipe_applied"]["learning_rate"] == 2e-4 and facts["recipe_applied"]["max_grad_norm"] == 0.3


@pytest.mark.slow
def test_unmodified_trl_script_by_path_user_flags_win(tiny_models, dataset_dir, tmp_path):
    import trl.scripts.sft as sft

    out = tmp_path / "out"
    proc = run_python([sft.__file__, "--model_name_or_path", tiny_models["llama"], "--dataset_name", dataset_dir,
                       "--output_dir", str(out), "--strategy=qlora", "--use_peft", "--lora_r", "8",
                       "--lora_target_modules", "q_proj", "v_proj", "--learning_rate", "1e-3", *TRAIN_FLAGS],
                      tmp_path)
    facts = assert_qlora_run(proc, out, "cli")
    assert facts["adapter"]["r"] == 8 and facts["adapter"]["target_modules"] == ["q_proj", "v_proj"]
    assert facts["adapter"]["alpha"] == 16  # the recipe's, not TRL's default of 32
    assert "learning_rate" in facts["user_kept"] and "learning_rate" not in facts["recipe_applied"]


@pytest.mark.slow
@pytest.mark.floor
def test_trl_cli(tiny_models, dataset_dir, tmp_path):
    out = tmp_path / "out"
    proc = run_command(["trl", "sft", "--model_name_or_path", tiny_models["gpt2"], "--dataset_name", dataset_dir,
                        "--output_dir", str(out), "--strategy", "qlora", *TRAIN_FLAGS], tmp_path)
    facts = assert_qlora_run(proc, out, "cli")
    assert facts["adapter"]["target_modules"] == ["c_attn", "c_fc", "c_proj"]  # GPT-2's Conv1D layers


@pytest.mark.slow
@pytest.mark.floor
def test_yaml_config_with_trl_cli(tiny_models, dataset_dir, tmp_path):
    out = tmp_path / "out"
    config = {"model_name_or_path": tiny_models["phi3"], "dataset_name": dataset_dir, "output_dir": str(out),
              "strategy": "qlora", "lora_r": 4, "use_bnb_nested_quant": False, "max_steps": 3,
              "per_device_train_batch_size": 4, "report_to": "none", "use_cpu": True, "save_strategy": "no",
              "max_length": 64}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    proc = run_command(["trl", "sft", "--config", "cfg.yaml"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    facts = report(out)
    assert facts["source"] == "yaml" and facts["adapter"]["r"] == 4
    assert facts["quantization"]["double_quant"] is False
    assert "qkv_proj" in facts["adapter"]["target_modules"]  # Phi-3's fused projection


@pytest.mark.slow
def test_yaml_env_block_sets_strategy(tiny_models, dataset_dir, tmp_path):
    out = tmp_path / "out"
    config = {"env": {"QLORA_PLUGIN_STRATEGY": "qlora"}, "model_name_or_path": tiny_models["llama"],
              "dataset_name": dataset_dir, "output_dir": str(out), "max_steps": 3, "report_to": "none",
              "use_cpu": True, "save_strategy": "no", "max_length": 64, "per_device_train_batch_size": 4}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    proc = run_python(["-m", "trl.scripts.sft", "--config", "cfg.yaml"], tmp_path)
    assert_qlora_run(proc, out, "yaml")


@pytest.mark.slow
def test_environment_variable(tiny_models, dataset_dir, tmp_path):
    out = tmp_path / "out"
    proc = run_python(["-m", "trl.scripts.sft", "--model_name_or_path", tiny_models["llama"], "--dataset_name",
                       dataset_dir, "--output_dir", str(out), *TRAIN_FLAGS], tmp_path,
                      {"QLORA_PLUGIN_STRATEGY": "qlora", "QLORA_PLUGIN_OPTIONS": '{"lora_r": 2}'})
    facts = assert_qlora_run(proc, out, "env")
    assert facts["adapter"]["r"] == 2


@pytest.mark.parametrize("script", ["user_argparse_sft.py", "user_hfparser_sft.py"])
@pytest.mark.slow
def test_users_own_script(script, tiny_models, dataset_dir, tmp_path):
    out = tmp_path / "out"
    if script == "user_argparse_sft.py":
        args = ["--model", tiny_models["llama"], "--data", dataset_dir, "--out", str(out)]
    else:
        args = ["--model", tiny_models["llama"], "--data", dataset_dir, "--output_dir", str(out), *TRAIN_FLAGS]
    proc = run_python([str(SCRIPTS / script), *args, "--strategy", "qlora", "--lora_r", "16"], tmp_path)
    facts = assert_qlora_run(proc, out, "cli")
    assert facts["adapter"]["r"] == 16


@pytest.mark.slow
def test_disable_switch_leaves_trl_untouched(tiny_models, dataset_dir, tmp_path):
    out = tmp_path / "out"
    proc = run_python(["-m", "trl.scripts.sft", "--model_name_or_path", tiny_models["llama"], "--dataset_name",
                       dataset_dir, "--output_dir", str(out), *TRAIN_FLAGS], tmp_path,
                      {"QLORA_PLUGIN_STRATEGY": "qlora", "QLORA_PLUGIN_DISABLE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[qlora-plugin]" not in proc.stdout
    assert not (out / "qlora_plugin_report.json").exists()
    assert (out / "model.safetensors").is_file()  # TRL's own full fine-tune, as without the plugin


@pytest.mark.slow
@pytest.mark.floor
def test_no_strategy_means_plain_trl(tiny_models, dataset_dir, tmp_path):
    """Without a strategy the patches are never installed: SFTTrainer.__init__ is TRL's own function."""
    proc = run_python(["-c", "import trl; from trl import SFTTrainer, TrlParser; "
                       "print(getattr(SFTTrainer.__init__, '_qlora_plugin', False), "
                       "getattr(TrlParser.set_defaults_with_config, '_qlora_plugin', False))"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False"]
