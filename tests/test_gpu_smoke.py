"""examples/gpu_smoke.py without a GPU: its figures, table, JSON and bookkeeping on made-up measurements, so the
one GPU run it is prepared for does not fail on its own code."""

from __future__ import annotations

import json
import sys

import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "examples"))

import gpu_smoke  # noqa: E402


def _report(**memory):
    return {"measured": {"first_loss": 7.2, "final_loss": 5.1, "steps": 10, "train_runtime_s": 4.0,
                         "peak_allocated_bytes": 3 * 2**30},
            "quantization": {"compute_dtype": "bfloat16", "quant_storage": "uint8", "embeddings_dtype": "bfloat16",
                             "cached_base": "/cache/entry"},
            "adapter": {"dtype": "bfloat16"}, "runtime": {"mixed_precision": "bf16", "engine": "none"},
            "memory": memory}


PROBE = {"optimizer": "PagedAdamW32bit", "state_tensors": 56, "paged_state_tensors": 48,
         "trainable_dtypes": ["bfloat16"], "mixed_precision": "bf16"}


def test_qlora_figures_from_a_made_up_gpu_run(tmp_path, monkeypatch):
    memory = {"memory_kind": "cuda_max_reserved", "measured_peak_bytes": 4 * 2**30,
              "predicted_allocator_bytes": 3.5 * 2**30, "predicted_peak_bytes": 5 * 2**30, "prediction_error": -0.125}
    monkeypatch.setattr(gpu_smoke.Smoke, "sft", lambda self, name, *flags, **kw: {
        "report": _report(**memory), "probe": PROBE, "out": tmp_path})
    figures = gpu_smoke.check_qlora(gpu_smoke.Smoke(tmp_path, 60))
    assert figures["status"] == "ok" and figures["loss_falls"] and figures["paged_state_tensors"] == "48/56"
    assert (figures["measured_reserved_mib"], figures["predicted_allocator_mib"]) == (4096.0, 3584.0)
    assert figures["measured_allocated_mib"] == 3072.0 and figures["steps_per_s"] == 2.5

    monkeypatch.setattr(gpu_smoke.Smoke, "sft", lambda self, name, *flags, **kw: {
        "report": _report(**memory), "probe": {**PROBE, "paged_state_tensors": 0}, "out": tmp_path})
    assert gpu_smoke.check_qlora(gpu_smoke.Smoke(tmp_path, 60))["status"] == "check"  # nothing paged: look


def test_cache_bytes_comparison():
    weights = {"w": (torch.randn(64, 128) * 0.02).to(torch.bfloat16)}
    cpu = gpu_smoke.quantized_tensors(weights, "cpu")
    assert "w.packed" in cpu and "w.absmax" in cpu
    assert gpu_smoke.compare_quantized(cpu, dict(cpu)) == {
        "identical": True, "tensors_differing": [], "packed_bytes_differing": f"0/{cpu['w.packed'].numel()}"}
    other = dict(cpu, **{"w.packed": cpu["w.packed"].clone()})
    other["w.packed"][:3] += 1
    found = gpu_smoke.compare_quantized(cpu, other)
    assert not found["identical"] and found["tensors_differing"] == ["w.packed"]
    assert found["packed_bytes_differing"].startswith("3/")


def test_every_check_is_recorded_and_saved_at_once(tmp_path, monkeypatch):
    """An error is recorded and the next check runs; what does not fit the budget is skipped with a reason;
    smoke.json is complete after every check; the exit status says whether all went well."""
    seen = []

    def passes(smoke):
        seen.append(json.loads((tmp_path / "smoke.json").read_text())["checks"] if seen else None)
        return {"figure": 1.5}

    def fails(smoke):
        raise RuntimeError("qlora: exit 1; last lines:\nCUDA out of memory")

    checks = {"environment": passes, "qlora": fails, "cache_bytes": passes, "resume": passes}
    monkeypatch.setattr(gpu_smoke, "CHECKS", checks)
    monkeypatch.setattr(gpu_smoke, "NEEDS", {"environment": 1, "qlora": 1, "cache_bytes": 1, "resume": 10**6})
    monkeypatch.setattr(gpu_smoke, "build_100m", lambda: tmp_path / "model")
    assert gpu_smoke.main(["--out", str(tmp_path), "--budget", "100"]) == 1
    results = json.loads((tmp_path / "smoke.json").read_text())["checks"]
    assert [results[n]["status"] for n in checks] == ["ok", "error", "ok", "skipped"]
    assert "CUDA out of memory" in results["qlora"]["error"] and "needs 1000000" in results["resume"]["error"]
    assert set(seen[1]) == {"environment", "qlora"}  # saved before the next check started
    table = (tmp_path / "smoke.md").read_text()
    assert "| qlora | error (" in table and "RuntimeError: qlora: exit 1; last lines:" in table
    assert "| environment | ok (" in table and "figure 1.5" in table


def test_no_gpu_stops_after_the_environment_check(tmp_path, monkeypatch):
    def no_gpu(smoke):
        raise RuntimeError("CUDA is not available")

    monkeypatch.setattr(gpu_smoke, "CHECKS", {"environment": no_gpu, "qlora": lambda smoke: {}})
    assert gpu_smoke.main(["--out", str(tmp_path)]) == 1
    assert list(json.loads((tmp_path / "smoke.json").read_text())["checks"]) == ["environment"]
