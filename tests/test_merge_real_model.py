"""`qlora-plugin merge` on a real model: SmolLM2-135M-Instruct trained 30 steps with the default strategy, merged
with no other flag (bf16 output). The old gate (greedy agreement >= 95% over 57 positions) refused exactly this
merge at 93% with a mean KL of 0.0034; the KL-against-the-rounding-floor gate passes it, and still refuses a wrong
quantization and a wrong base of the same shape. Trains, so slow (several minutes on 2 CPU cores)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_command

pytestmark = pytest.mark.slow
DATA = REPO / "tests" / "data" / "city_json"


@pytest.fixture(scope="module")
def trained(smollm2, tmp_path_factory) -> tuple:
    root = tmp_path_factory.mktemp("real-merge")
    model = Path(smollm2)
    done = run_command(
        ["qlora-plugin", "run", "--", sys.executable, "-m", "trl.scripts.sft", "--model_name_or_path", str(model),
         "--dataset_name", str(DATA), "--strategy", "qlora", "--seed", "0", "--max_steps", "30",
         "--per_device_train_batch_size", "4", "--max_length", "128", "--logging_steps", "10", "--save_strategy",
         "no", "--report_to", "none", "--use_cpu", "--disable_tqdm", "true", "--output_dir", str(root / "run")],
        cwd=REPO, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    return model, root / "run", root


def merge(*argv, cwd):
    return run_command(["qlora-plugin", "merge", *map(str, argv)], cwd, timeout=1800)


def test_a_real_models_default_merge_passes(trained):
    _, run, root = trained
    done = merge("--adapter", run, "--out", root / "merged", cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((root / "merged" / "merge_report.json").read_text())
    print(done.stdout)
    assert report["output_dtype"] == "bfloat16" and report["passed"] and report["positions"] >= 300
    assert report["rounding_floor"]["mean_kl"] > 0 and report["merge"]["mean_kl"] <= report["thresholds"]["max_mean_kl"]
    assert report["naive_merge_into_16bit_base"]["mean_kl"] > 10 * report["thresholds"]["max_mean_kl"]


def test_a_real_model_merged_with_the_wrong_quantization_fails(trained):
    _, run, root = trained
    done = merge("--adapter", run, "--out", root / "fp4", "--bnb_4bit_quant_type", "fp4", cwd=root)
    assert done.returncode == 2 and "failed its fidelity check (mean KL" in done.stderr, done.stderr[-3000:]
    assert not (root / "fp4").exists() and (root / "fp4.incomplete" / "merge_report.json").is_file()


def test_a_real_model_merged_into_another_base_of_the_same_shape_fails(trained):
    """The base with its first two blocks swapped: every tensor fits, the model is not the one trained on."""
    from safetensors.torch import load_file, save_file

    model, run, root = trained
    other = root / "other-base"
    shutil.copytree(model, other)
    shard = other / "model.safetensors"
    tensors = load_file(shard)
    swapped = {k.replace("layers.0.", "layers.#.").replace("layers.1.", "layers.0.").replace("layers.#.", "layers.1."): v
               for k, v in tensors.items()}
    save_file(swapped, shard, metadata={"format": "pt"})
    done = merge("--adapter", run, "--base", other, "--out", root / "wrong", cwd=root)
    assert done.returncode == 2 and "failed its fidelity check (mean KL" in done.stderr, done.stderr[-3000:]
