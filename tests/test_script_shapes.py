"""`--strategy qlora` in SFT scripts that load the model themselves, the shapes public scripts have: checked from
the outside (the report, the saved adapter, what the script printed about its own objects)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import REPO, run_python

SCRIPTS = REPO / "tests" / "scripts"
SMALL_RUN = {"max_steps": 3, "per_device_train_batch_size": 4, "report_to": "none", "use_cpu": True,
             "logging_steps": 1, "save_strategy": "no", "max_length": 64}


def _recipe(tmp_path, **keys) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({**SMALL_RUN, **keys}))
    return str(path)


def _outcome(proc, out):
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "qlora_plugin_report.json").read_text())
    adapter = json.loads((out / "adapter_config.json").read_text())
    return report, adapter


def _assert_qlora(report):
    q = report["quantization"]
    assert q["quant_type"] == "nf4" and q["double_quant"] is True and q["layers_4bit"] == 14
    assert report["optimizer"] == {"name": "paged_adamw_32bit", "class": "PagedAdamW32bit"}
    assert report["loaded_by"] == "strategy, in the script's from_pretrained"
    assert report["measured"]["steps"] == 3


@pytest.mark.slow
@pytest.mark.floor
def test_trl_parser_yaml_recipe_script_loads_in_4bit(tiny_models, dataset_dir, tmp_path):
    """TrlParser + ModelConfig + YAML + the script's own from_pretrained + SFTTrainer(model=object,
    peft_config=get_peft_config(model_args)): no 16-bit load, the strategy's LoRA, the user's SFT keys kept."""
    out = tmp_path / "out"
    recipe = _recipe(tmp_path, model_name_or_path=tiny_models["llama"], dataset_name=dataset_dir,
                     output_dir=str(out), strategy="qlora", lr_scheduler_type="cosine",
                     gradient_checkpointing_kwargs={"use_reentrant": False})
    proc = run_python([str(SCRIPTS / "public_recipe_sft.py"), "--config", recipe], tmp_path)
    report, adapter = _outcome(proc, out)
    assert "script sees: load_in_4bit=True use_peft=True lora_r=64 lora_alpha=16 quantization_config=True" \
        in proc.stdout
    assert "script loaded: 4bit=True use_cache=False" in proc.stdout  # the script's own kwargs kept
    assert "  loaded by  : strategy, in the script's from_pretrained" in proc.stdout  # the summary says so
    _assert_qlora(report)
    assert adapter["r"] == 64 and adapter["lora_alpha"] == 16
    assert report["adapter"]["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                                   "up_proj", "v_proj"]
    assert "lr_scheduler_type" in report["user_kept"] and "lr_scheduler_type" not in report["recipe_applied"]


@pytest.mark.slow
def test_recipe_that_already_sets_the_qlora_keys(tiny_models, dataset_dir, tmp_path):
    """A recipe that trained in 4-bit before keeps working with the strategy added; its values win."""
    out = tmp_path / "out"
    recipe = _recipe(tmp_path, model_name_or_path=tiny_models["llama"], dataset_name=dataset_dir,
                     output_dir=str(out), load_in_4bit=True, use_peft=True, lora_r=16, lora_alpha=16,
                     lora_target_modules="all-linear", lora_modules_to_save=["lm_head", "embed_tokens"])
    proc = run_python([str(SCRIPTS / "public_recipe_sft.py"), "--config", recipe, "--strategy", "qlora"], tmp_path)
    report, adapter = _outcome(proc, out)
    assert "script sees: load_in_4bit=True use_peft=True lora_r=16 lora_alpha=16 quantization_config=True" \
        in proc.stdout
    _assert_qlora(report)
    assert adapter["r"] == 16 and adapter["lora_alpha"] == 16
    assert sorted(adapter["modules_to_save"]) == ["embed_tokens", "lm_head"]
    saved = set(__import__("safetensors.torch", fromlist=["load_file"]).load_file(
        str(out / "adapter_model.safetensors")))
    assert any("lm_head" in name for name in saved) and any("embed_tokens" in name for name in saved)


@pytest.mark.slow
def test_own_dataclass_concrete_class_no_model_name_or_path(tiny_models, dataset_dir, tmp_path):
    """HfArgumentParser with the script's own dataclass, `LlamaForCausalLM.from_pretrained`: the first causal LM
    the script loads is the one trained."""
    out = tmp_path / "out"
    proc = run_python([str(SCRIPTS / "own_dataclass_sft.py"), "--model_path", tiny_models["llama"], "--data",
                       dataset_dir, "--output_dir", str(out), "--strategy", "qlora", "--lora_r", "8",
                       *[f"--{k}" if v is True else f"--{k}={v}" for k, v in SMALL_RUN.items()]], tmp_path)
    report, adapter = _outcome(proc, out)
    assert "script loaded: 4bit=True" in proc.stdout
    _assert_qlora(report)
    assert adapter["r"] == 8 and report["adapter"]["layers"] == 14


@pytest.mark.slow
def test_a_second_and_third_model_are_left_alone(tiny_models, dataset_dir, tmp_path):
    """A frozen teacher loaded first (another folder) and a reference copy of the student loaded after it stay as
    the script asked; only the model from --model_name_or_path is loaded by the strategy."""
    out = tmp_path / "out"
    recipe = _recipe(tmp_path, model_name_or_path=tiny_models["llama"], dataset_name=dataset_dir,
                     output_dir=str(out), teacher_model_name_or_path=tiny_models["gpt2"])
    proc = run_python([str(SCRIPTS / "frozen_teacher_sft.py"), "--config", recipe, "--strategy", "qlora"], tmp_path)
    report, adapter = _outcome(proc, out)
    assert "script loaded teacher: 4bit=False dtype=torch.float32" in proc.stdout
    assert "script loaded student: 4bit=True" in proc.stdout
    assert "script loaded reference: 4bit=False dtype=torch.float32" in proc.stdout
    _assert_qlora(report)


@pytest.mark.slow
def test_lora_strategy_in_a_script_that_loads_the_model(tiny_models, dataset_dir, tmp_path):
    out = tmp_path / "out"
    recipe = _recipe(tmp_path, model_name_or_path=tiny_models["llama"], dataset_name=dataset_dir,
                     output_dir=str(out), lora_r=4)
    proc = run_python([str(SCRIPTS / "public_recipe_sft.py"), "--config", recipe, "--strategy", "lora"], tmp_path)
    report, adapter = _outcome(proc, out)
    assert "script sees: load_in_4bit=False use_peft=True lora_r=4 lora_alpha=16 quantization_config=False" \
        in proc.stdout
    assert report["quantization"] is None and report["strategy"] == "lora"
    assert report["loaded_by"] == "strategy, in the script's from_pretrained"
    assert adapter["r"] == 4


@pytest.mark.slow
def test_a_16bit_object_the_plugin_could_not_load_is_refused_with_the_fix(tiny_models, dataset_dir, tmp_path):
    """A model loaded before `import trl` (so before activation) cannot be intercepted: refused, naming the fix."""
    script = tmp_path / "early.py"
    script.write_text(
        "import sys\nfrom transformers import AutoModelForCausalLM\n"
        f"model = AutoModelForCausalLM.from_pretrained({tiny_models['llama']!r})\n"
        "from datasets import load_dataset\nfrom trl import SFTConfig, SFTTrainer\n"
        f"SFTTrainer(model=model, args=SFTConfig({str(tmp_path / 'out')!r}, use_cpu=True, report_to='none'),\n"
        f"           train_dataset=load_dataset({dataset_dir!r})['train'])\n")
    proc = run_python([str(script), "--strategy", "qlora"], tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "16-bit model object the plugin did not load" in proc.stderr
    assert "Load it after `import trl`" in proc.stderr and "--strategy lora" in proc.stderr


@pytest.mark.slow
def test_an_8bit_config_is_refused_before_any_weight_is_read(tiny_models, dataset_dir, tmp_path):
    out = tmp_path / "out"
    recipe = _recipe(tmp_path, model_name_or_path=tiny_models["llama"], dataset_name=dataset_dir,
                     output_dir=str(out), strategy="qlora")
    script = tmp_path / "eight.py"
    script.write_text((SCRIPTS / "public_recipe_sft.py").read_text().replace(
        "quantization_config = get_quantization_config(model_args)",
        "from transformers import BitsAndBytesConfig\n    quantization_config = BitsAndBytesConfig(load_in_8bit=True)"))
    proc = run_python([str(script), "--config", recipe], tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "load_in_8bit contradicts the strategy" in proc.stderr
    assert "script loaded" not in proc.stdout and not out.exists()


@pytest.mark.parametrize("same", [True, False])
def test_the_training_model_is_recognised_however_its_path_is_written(tiny_models, same, tmp_path):
    from qlora_plugin.integration.model_loading import _same_model

    path = Path(tiny_models["llama"])
    other = str(path.parent / "." / path.name) if same else tiny_models["gpt2"]
    assert _same_model(other, str(path)) is same
    assert _same_model("org/model", "org/model/") and not _same_model("org/model", "org/other")
