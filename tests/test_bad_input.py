"""Bad input: a clear message naming what was wrong and what is allowed, a non-zero exit, no traceback,
and no output folder written."""

from __future__ import annotations

import pytest
import yaml

from conftest import TRAIN_FLAGS, run_python


def sft(tiny_models, dataset_dir, out, *extra):
    return ["-m", "trl.scripts.sft", "--model_name_or_path", tiny_models["llama"], "--dataset_name", dataset_dir,
            "--output_dir", str(out), *TRAIN_FLAGS, *extra]


def assert_clean_failure(proc, out, *fragments):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])  # one status for every user error
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "qlora-plugin: error" in proc.stderr, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr[-3000:]
    assert not out.exists()


CASES = {
    "unknown strategy": (["--strategy", "qlroa"], ["Unknown strategy 'qlroa'", "Did you mean 'qlora'", "lora"]),
    "strategy without a name": (["--strategy"], ["`--strategy` needs a name"]),
    "rank zero": (["--strategy", "qlora", "--lora_r", "0"], ["`lora_r` must be a positive integer"]),
    "rank not a number": (["--strategy", "qlora", "--lora_r", "big"], ["--lora_r", "invalid int value"]),
    "bad quant type": (["--strategy", "qlora", "--bnb_4bit_quant_type", "int4"], ["invalid choice", "nf4"]),
    "bad compute dtype": (["--strategy", "qlora", "--bnb_4bit_compute_dtype", "fp8"], ["invalid choice"]),
    "dropout out of range": (["--strategy", "qlora", "--lora_dropout", "1.5"], ["`lora_dropout` must be in [0, 1)"]),
    "8-bit contradicts": (["--strategy", "qlora", "--load_in_8bit"], ["`--load_in_8bit` contradicts"]),
    "4-bit contradicts lora": (["--strategy", "lora", "--load_in_4bit"], ["contradicts `--strategy lora`"]),
    "missing hook file": (["--strategy", "qlora", "--qlora_hooks", "nope.py"], ["Hook file 'nope.py' does not exist"]),
    "hook file not python": (["--strategy", "qlora", "--qlora_hooks", "hooks.txt"], ["must be a Python file"]),
    "target modules match nothing": (
        ["--strategy", "qlora", "--lora_target_modules", "q_proj", "qkv"],
        ["['qkv'] match no layer", "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"],
    ),
    "loftq on a 16-bit base": (["--strategy", "lora", "--init_lora_weights", "loftq"],
                               ["`init_lora_weights loftq` cannot run here: the base is 16-bit"]),
    "loftq with DoRA": (["--strategy", "qlora", "--init_lora_weights", "loftq", "--use_dora", "true"],
                        ["`init_lora_weights loftq` cannot run here: DoRA"]),
    "calibrated loftq with DoRA": (
        ["--strategy", "qlora", "--init_lora_weights", "loftq_calibrated", "--use_dora", "true"],
        ["`init_lora_weights loftq_calibrated` cannot run here: DoRA", "--init_lora_weights default"],
    ),
    "unknown adapter start": (["--strategy", "qlora", "--init_lora_weights", "pissa"], ["invalid choice", "loftq"]),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.slow
def test_bad_command_line(case, tiny_models, dataset_dir, tmp_path):
    extra, fragments = CASES[case]
    out = tmp_path / "out"
    proc = run_python(sft(tiny_models, dataset_dir, out, *extra), tmp_path)
    assert_clean_failure(proc, out, *fragments)


@pytest.mark.slow
def test_hook_file_that_fails_to_import(tiny_models, dataset_dir, tmp_path):
    (tmp_path / "broken.py").write_text("import not_a_real_module\n")
    out = tmp_path / "out"
    proc = run_python(sft(tiny_models, dataset_dir, out, "--strategy", "qlora"), tmp_path,
                      {"QLORA_PLUGIN_HOOKS": "broken.py"})
    assert_clean_failure(proc, out, "Hook file 'broken.py' failed to import", "ModuleNotFoundError")


@pytest.mark.slow
def test_bad_yaml_option(tiny_models, dataset_dir, tmp_path):
    out = tmp_path / "out"
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({"strategy": "qlora", "lora_alpha": -1}))
    proc = run_python(sft(tiny_models, dataset_dir, out, "--config", "cfg.yaml"), tmp_path)
    assert_clean_failure(proc, out, "`lora_alpha` must be a positive number")


@pytest.mark.slow
def test_bad_environment_options(tiny_models, dataset_dir, tmp_path):
    out = tmp_path / "out"
    proc = run_python(sft(tiny_models, dataset_dir, out), tmp_path,
                      {"QLORA_PLUGIN_STRATEGY": "qlora", "QLORA_PLUGIN_OPTIONS": "{lora_r: 8"})
    assert_clean_failure(proc, out, "QLORA_PLUGIN_OPTIONS must be a JSON object")


@pytest.mark.slow
def test_missing_bitsandbytes(tiny_models, dataset_dir, tmp_path):
    """A broken or absent bitsandbytes gets an install hint, not an ImportError traceback."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "sitecustomize.py").write_text(
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'bitsandbytes' or name.startswith('bitsandbytes.'):\n"
        "            raise ImportError('No module named bitsandbytes (blocked by the test)')\n"
        "sys.meta_path.insert(0, Block())\n"
    )
    out = tmp_path / "out"
    proc = run_python(sft(tiny_models, dataset_dir, out, "--strategy", "qlora"), tmp_path,
                      {"PYTHONPATH": str(shadow)})
    assert_clean_failure(proc, out, "needs bitsandbytes", "pip install")
