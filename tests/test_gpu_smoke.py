"""examples/bench/gpu_smoke.py without a GPU: its figures, table, JSON and bookkeeping on made-up measurements, so the
one GPU run it is prepared for does not fail on its own code."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "examples"))
sys.path.insert(0, str(REPO / "examples" / "bench"))

import gpu_smoke  # noqa: E402


def _report(**memory):
    return {"measured": {"first_loss": 7.2, "final_loss": 5.1, "steps": 10, "train_runtime_s": 4.0,
                         "peak_allocated_bytes": 3 * 2**30},
            "quantization": {"compute_dtype": "bfloat16", "quant_storage": "uint8", "embeddings_dtype": "bfloat16",
                             "cached_base": "/cache/entry"},
            "adapter": {"dtype": "bfloat16"}, "runtime": {"mixed_precision": "bf16", "engine": "none"},
            "memory": memory}


PROBE = {"optimizer": "PagedAdamW32bit", "state_tensors": 56, "paged_state_tensors": 48,
         "trainable_dtypes": ["bfloat16"], "mixed_precision": "bf16", "context_bytes": 500 * 2**20,
         "max_memory_reserved": 5 * 2**30, "max_memory_allocated": 4 * 2**30}


def test_qlora_figures_from_a_made_up_gpu_run(tmp_path, monkeypatch):
    memory = {"memory_kind": "cuda_max_reserved", "measured_peak_bytes": 4 * 2**30,
              "predicted_allocator_bytes": 3.5 * 2**30, "predicted_peak_bytes": 5 * 2**30, "prediction_error": -0.125}
    monkeypatch.setattr(gpu_smoke.Smoke, "sft", lambda self, name, *flags, **kw: {
        "report": _report(**memory), "probe": PROBE, "out": tmp_path})
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    figures = gpu_smoke.check_qlora(gpu_smoke.Smoke(tmp_path, 60))
    assert figures["status"] == "ok" and figures["loss_falls"] and figures["paged_state_tensors"] == "48/56"
    assert (figures["cuda_context_mib"], figures["allocator_reserve_mib"]) == (500.0, 1024.0)
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
    assert gpu_smoke.main(["--out", str(tmp_path), "--work", str(tmp_path / "work"), "--budget", "100"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smoke.json", "smoke.md", "work"]  # two files come back
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
    assert gpu_smoke.main(["--out", str(tmp_path), "--work", str(tmp_path / "work")]) == 1
    assert list(json.loads((tmp_path / "smoke.json").read_text())["checks"]) == ["environment"]


def test_the_cache_check_wants_an_entry_made_on_the_gpu(tmp_path):
    smoke = gpu_smoke.Smoke(tmp_path, 60)
    assert gpu_smoke.check_cache(smoke)["status"] == "check"  # no entry: the first run cached nothing
    entry = smoke.cache / "base-0123"
    entry.mkdir(parents=True)
    (entry / "qlora_plugin_cache.json").write_text(json.dumps({"settings": {"device": "cpu"}}))
    assert gpu_smoke.check_cache(smoke) == {"entries": 1, "quantized_on": ["cpu"], "status": "check"}
    (entry / "qlora_plugin_cache.json").write_text(json.dumps({"settings": {"device": "cuda"}}))
    assert gpu_smoke.check_cache(smoke)["status"] == "ok"


def test_the_merge_check_reads_the_merge_report(tmp_path, monkeypatch):
    smoke = gpu_smoke.Smoke(tmp_path, 60)
    (tmp_path / "qlora").mkdir()
    (tmp_path / "qlora" / "adapter_model.safetensors").write_bytes(b"")

    def merge(self, argv, name, *args, **kwargs):
        out = Path(argv[argv.index("--out") + 1])
        out.mkdir()
        (out / "merge_report.json").write_text(json.dumps({"passed": True, "mean_kl": 0.003, "layers": [1, 2]}))

    monkeypatch.setattr(gpu_smoke.Smoke, "run", merge)
    assert gpu_smoke.check_merge(smoke) == {"passed": True, "mean_kl": 0.003, "status": "ok"}


# --- the wheelhouse the GPU machine installs from (examples/bench/gpu_wheelhouse.py) ---------------------------------

import gpu_wheelhouse  # noqa: E402


def _wheel(path: Path, files: dict) -> Path:
    import zipfile

    record = "".join(f"{name},sha256=x,{len(data)}\n" for name, data in files.items())
    with zipfile.ZipFile(path, "w") as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
        wheel.writestr("bitsandbytes-0.50.2.dist-info/RECORD", record + "bitsandbytes-0.50.2.dist-info/RECORD,,\n")
    return path


def test_bitsandbytes_is_slimmed_to_the_cpu_and_cuda_13_libraries(tmp_path):
    import zipfile

    names = ["libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so", "libbitsandbytes_cuda132.so",
             "libbitsandbytes_cuda128.so", "libbitsandbytes_rocm72.so"]
    wheel = _wheel(tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl",
                   {"bitsandbytes/__init__.py": b"", **{f"bitsandbytes/{n}": b"x" * 100 for n in names}})
    gpu_wheelhouse.slim_bitsandbytes(wheel)
    with zipfile.ZipFile(wheel) as slim:
        kept = sorted(slim.namelist())
        record = slim.read("bitsandbytes-0.50.2.dist-info/RECORD").decode()
    assert kept == ["bitsandbytes-0.50.2.dist-info/RECORD", "bitsandbytes/__init__.py",
                    "bitsandbytes/libbitsandbytes_cpu.so", "bitsandbytes/libbitsandbytes_cuda130.so",
                    "bitsandbytes/libbitsandbytes_cuda132.so"]
    assert "cuda128" not in record and "rocm" not in record and "cuda130" in record


def test_the_wheelhouse_pins_the_declared_floors():
    pins = gpu_wheelhouse.floors()
    wanted = gpu_wheelhouse.requirements(pins)
    assert f"bitsandbytes=={pins['bitsandbytes']}" in wanted and f"trl=={pins['trl']}" in wanted
    assert f"datasets=={pins['datasets']}" in wanted
    assert not any(w.startswith(("torch", "transformers", "accelerate")) for w in wanted)  # the image's own


def test_datasets_own_needs_are_read_from_its_wheel(tmp_path):
    import zipfile

    wheel = tmp_path / "datasets-4.8.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("datasets-4.8.0.dist-info/METADATA", "Name: datasets\nRequires-Dist: dill<0.3.9,>=0.3.0\n"
                         "Requires-Dist: multiprocess<0.70.17\nRequires-Dist: pyarrow>=15.0.0\n"
                         "Requires-Dist: dill; extra == \"tests\"\n")
    assert gpu_wheelhouse.needs_of(wheel) == ["dill<0.3.9,>=0.3.0", "multiprocess<0.70.17"]


@pytest.mark.slow
def test_the_wheelhouse_builds_under_the_limit_and_installs_for_python_3_12(tmp_path):
    """The real build (downloads from the registry, builds this project's wheel), its size, and an install of every
    wheel with the GPU image's Python (3.12) as `gpu_smoke.sh` does it, without dependencies (the image has them)."""
    import shutil
    import subprocess

    candidates = [shutil.which("python3.12"), *map(str, Path.home().glob(".pyenv/versions/3.12*/bin/python3.12"))]
    python312 = next((c for c in candidates if c and subprocess.run([c, "-c", ""], capture_output=True).returncode == 0),
                     None)
    if python312 is None:
        pytest.skip("needs a python3.12 to install the wheels as the GPU image would")
    wheels = gpu_wheelhouse.build(tmp_path / "whl")
    names = sorted(w.name.split("-")[0] for w in wheels)
    assert names == ["bitsandbytes", "datasets", "dill", "multiprocess", "peft", "pluggy", "qlora_plugin", "trl"]
    assert sum(w.stat().st_size for w in wheels) < gpu_wheelhouse.LIMIT
    target = tmp_path / "site"
    proc = subprocess.run([python312, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                           "--target", str(target), *map(str, wheels)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (target / "qlora_plugin_activate.pth").exists() and (target / "qlora_plugin" / "cli.py").exists()
    assert sorted(p.name for p in (target / "bitsandbytes").glob("libbitsandbytes_*")) == [
        "libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so", "libbitsandbytes_cuda132.so"]
