"""What a new user reads first says what it means (issue 16, item 8): the summary's warmup is a share of the steps
and it names the loaded hook files and plugins; `qlora-plugin strategies` lists only options a strategy uses; the
README's install section gives commands that work, not a placeholder."""

from __future__ import annotations

import re

import pytest
from datasets import load_dataset

from conftest import DATA, REPO, run_command


def summary(tiny_models, tmp_path, hook_files=()) -> str:
    from trl import SFTConfig

    from qlora_plugin import apply_strategy
    from qlora_plugin.training.report import StrategyReportCallback, format_summary

    args = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=1, report_to="none", use_cpu=True, max_length=32)
    kwargs = apply_strategy({"model": tiny_models["llama"], "args": args,
                             "train_dataset": load_dataset(str(DATA))["train"]}, "qlora", hook_files=hook_files)
    report = next(c for c in kwargs["callbacks"] if isinstance(c, StrategyReportCallback))
    return format_summary(report.facts)


@pytest.mark.slow
def test_the_summary_names_hook_files_and_plugins_and_reads_warmup_as_a_share(tiny_models, tmp_path):
    hook = tmp_path / "my_hooks.py"
    hook.write_text("from qlora_plugin import hookimpl\n\n\n@hookimpl\ndef qlora_run_facts():\n    return None\n")
    text = summary(tiny_models, tmp_path, hook_files=[str(hook), "qdora"])
    assert f"  plugins    : hook files {hook.resolve()}; packaged hooks qdora\n" in text
    assert "warmup_steps=0.03 (3% of the steps)" in text
    assert "  plugins    : built-in only (no hook files, no installed plugins)\n" in summary(tiny_models, tmp_path)


@pytest.mark.slow
def test_strategies_lists_only_the_options_a_strategy_uses(tmp_path):
    proc = run_command(["qlora-plugin", "strategies"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    blocks = proc.stdout.split("\n\n")
    lora, qlora = (next(b for b in blocks if b.startswith(f"{name}  [")) for name in ("lora", "qlora"))
    for four_bit in ("--bnb_4bit_quant_type", "--use_bnb_nested_quant", "--bnb_4bit_quant_storage",
                     "--quantized_cache", "--cpu_dequant_buffer", "--reuse_dequantized_weights"):
        assert four_bit not in lora and four_bit in qlora, four_bit
    assert "--load_in_4bit (default: False)" in lora and "--bnb_4bit_compute_dtype" in lora  # it picks the dtype
    assert "(a 16-bit base: the 4-bit options" in lora


def test_readme_install_gives_real_commands():
    readme = (REPO / "README.md").read_text()
    install = readme.split("## Install into another project")[1]
    assert "<this repository>" not in readme
    commands = re.findall(r"^(pip install \S+.*?)(?:\s+#.*)?$", install, re.MULTILINE)
    assert any(c.startswith("pip install /path/to/qlora-plugin") for c in commands), commands
    assert any("git+https://" in c for c in commands), commands
    assert "pip wheel --no-deps -w dist ." in install
    assert any(c.startswith("pip install dist/qlora_plugin-0.1.0-py3-none-any.whl") for c in commands), commands
