"""The benchmark harness's arithmetic and report (examples/bench/benchmark.py, benchmark_report.py), on made-up runs:
the figures in docs/benchmarks.md are only as right as these."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from conftest import REPO


def _load(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "examples" / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _run(first, step, rss, anon=None, loss=1.0):
    return {"first_step_s": first, "step_s": step, "peak_rss_mib": rss, "peak_anon_mib": anon or rss,
            "final_loss": loss}


RESULTS = {
    "qlora": [_run(60, 10, 100), _run(20, 12, 110), _run(22, 11, 90)],
    "trl-recipe": [_run(40, 20, 100), _run(40, 20, 100), _run(44, 24, 100)],
    "trl-default": [_run(30, 10, 200), _run(30, 10, 200), _run(30, 10, 200)],
    "lora": [_run(20, 10, 400), _run(20, 10, 400), _run(20, 10, 400)],
    "qlora-reuse": [_run(20, 9, 100), _run(20, 9, 100), _run(20, 9, 100)],
    "qlora-buffer": [_run(20, 12, 100), _run(20, 12, 100), _run(20, 12, 100)],
    "qlora-glibc": [_run(20, 11, 200), _run(20, 11, 220), _run(20, 11, 180)],
    "qlora-torch-dropout": [_run(20, 12, 100), _run(20, 15, 110), _run(20, 11, 90)],
    "qlora-peft-init": [_run(50, 10, 100), _run(15, 12, 110), _run(16, 11, 90)],
}


def test_medians_and_ranges():
    bench = _load("benchmark")
    summary = bench.summarise(RESULTS)
    assert summary["qlora"]["step_s"] == {"median": 11, "min": 10, "max": 12}
    assert summary["trl-recipe"]["first_step_s"]["median"] == 40


def test_ratios_are_taken_round_by_round_and_start_up_skips_the_cache_filling_round():
    bench = _load("benchmark")
    ratios = bench.ratios(RESULTS)
    assert ratios["qlora/trl-recipe"]["step_s"] == 0.5  # median of 10/20, 12/20, 11/24
    assert ratios["qlora/trl-recipe"]["first_step_s"] == (20 / 40 + 22 / 44) / 2  # round 1 (60 s) left out
    assert ratios["qlora/lora"]["peak_rss_mib"] == 0.25
    assert ratios["qlora-reuse/qlora"]["step_s"] == 9 / 11
    assert ratios["qlora-buffer/qlora"]["step_s"] == 12 / 11  # median of 12/10, 12/12, 12/11
    assert ratios["qlora/qlora-glibc"]["peak_rss_mib"] == 0.5  # 100/200, 110/220, 90/180
    assert ratios["qlora/qlora-torch-dropout"]["step_s"] == 10 / 12  # median of 10/12, 12/15, 11/11
    assert ratios["qlora/qlora-peft-init"]["first_step_s"] == (20 / 15 + 22 / 16) / 2  # what the LoftQ start costs


def test_report_has_a_row_for_every_configuration_and_pair(tmp_path):
    bench = _load("benchmark")
    report = _load("benchmark_report")
    size = {"summary": bench.summarise(RESULTS), "ratios": bench.ratios(RESULTS)}
    table = report.table(size)
    for label in report.LABELS.values():
        assert label in table
    assert "| qlora-reuse/trl-default | " in report.ratio_table(size)


def test_targets_table_says_met_or_not():
    bench = _load("benchmark")
    report = _load("benchmark_report")
    size = {"summary": bench.summarise(RESULTS), "ratios": bench.ratios(RESULTS)}
    rows = {line.split(" | ")[0].lstrip("| "): line for line in report.targets_table(size).splitlines()[2:]}
    assert rows["(a) vs (d): peak process memory ≤ 0.6x"].endswith("| 0.250x | yes |")
    assert rows["(a) vs (b): step time within 2% (or faster)"].endswith("| 0.500x | yes |")
    assert rows["(a) vs (c): not slower"].endswith("| 1.100x | **no** |")  # median of 10/10, 12/10, 11/10
    assert rows["(a') vs (c): not slower"].endswith("| 0.900x | yes |")
    assert rows["(a) vs (c): final loss no worse"].endswith("| yes |")


def test_cpu_runs_get_use_cpu_and_cuda_runs_do_not(tmp_path):
    bench = _load("benchmark")
    cpu = bench.sft_command("qlora", tmp_path, 4, 512, 1, tmp_path / "out", "cpu")
    cuda = bench.sft_command("trl-default", tmp_path, 4, 512, 1, tmp_path / "out", "cuda")
    assert "--use_cpu" in cpu and "--use_cpu" not in cuda
    assert "--bf16" not in cuda  # on a GPU TRL's own default (bf16 where supported) stands
    assert cuda[cuda.index("--max_length") + 1] == "512" and "--load_in_4bit" in cuda
    glibc = bench.sft_command("qlora-glibc", tmp_path, 4, 512, 1, tmp_path / "out", "cpu")
    assert cpu[1:3] == ["run", "--"] and cpu[0].endswith("qlora-plugin")  # started with the malloc settings
    assert glibc[0] == sys.executable and "--strategy" in glibc  # glibc's defaults: no launcher


def test_gpu_memory_of_one_process_from_nvidia_smi():
    bench = _load("benchmark")
    output = "4242, 10240\n17, 999\n4242, 512\nnot a row\n"
    assert bench.gpu_mib_of(4242, output) == 10752  # every context of the process, summed
    assert bench.gpu_mib_of(5, output) == 0
    assert bench.gpu_mib_of(17, "17, [N/A]\n") == 0


def test_gpu_run_report_has_the_gpu_column_and_the_published_figures(tmp_path):
    bench = _load("benchmark")
    report = _load("benchmark_report")
    runs = {name: [{**r, "peak_gpu_mib": 8192.0 * (2 if name == "lora" else 1)} for r in RESULTS[name][:1]]
            for name in ("qlora", "lora", "trl-default")}
    size = {"summary": bench.summarise(runs), "ratios": bench.ratios(runs), "four_bit_mib": {"nf4+dq": 1, "nf4": 1}}
    assert "peak GPU (MiB)" in report.table(size)
    assert size["ratios"]["qlora/lora"]["peak_gpu_mib"] == 0.5
    assert "peak GPU (MiB)" in report.ratio_table(size)
    text = report.published_beside(size, {"batch": 2, "seq_len": 1024})
    assert "torchtune" in text and "litgpt" in text
    assert "(a) `--strategy qlora`: 8.00 GiB peak" in text and "205 tokens/s at batch 2 x 1024" in text  # 2048 / 10 s
    everything = {"machine": "test", "command": "python examples/bench/benchmark.py --device cuda",
                  "settings": {"rounds": 1, "batch": 2, "seq_len": 1024, "steps": 6}, "sizes": {"8b": size}}
    report.write_report(everything, tmp_path)
    written = (tmp_path / "benchmarks.md").read_text()
    assert "Published figures" in written and (tmp_path / "benchmarks.png").exists()
    cpu_only = {"summary": bench.summarise(RESULTS), "ratios": bench.ratios(RESULTS)}
    assert "peak GPU" not in report.table(cpu_only) and "peak GPU" not in report.ratio_table(cpu_only)


def test_a_gpu_run_nvidia_smi_cannot_see_is_measured_in_the_process(tmp_path):
    """In containers and MIG instances nvidia-smi lists no process: its figure is then missing (None), not 0,
    and the in-process peak (`cuda_peak.py`'s max_memory_reserved) carries the run. Before, every ratio over
    nvidia-smi's zeros was the median of nothing, and the benchmark crashed after all its runs."""
    bench = _load("benchmark")
    report = _load("benchmark_report")
    peak = tmp_path / "peak.json"
    peak.write_text('{"max_memory_reserved": 3221225472, "max_memory_allocated": 2147483648}')
    assert bench.gpu_peaks(peak, 0.0) == {"peak_gpu_mib": 3072.0, "peak_gpu_smi_mib": None}
    assert bench.gpu_peaks(tmp_path / "missing.json", 0.0) == {"peak_gpu_mib": None, "peak_gpu_smi_mib": None}
    runs = {name: [{**r, "peak_gpu_mib": 4096.0 * (2 if name == "lora" else 1), "peak_gpu_smi_mib": None}
                   for r in RESULTS[name]] for name in ("qlora", "lora", "trl-default")}
    size = {"runs": runs, "summary": bench.summarise(runs), "ratios": bench.ratios(runs)}
    assert size["ratios"]["qlora/lora"]["peak_gpu_mib"] == 0.5
    assert "peak_gpu_smi_mib" not in size["summary"]["qlora"]
    assert "peak GPU (MiB)" in report.table(size) and "nvidia-smi" not in report.table(size)


def test_a_failed_run_is_recorded_and_the_measured_ones_are_kept(tmp_path, monkeypatch):
    """`main` writes results.json after every run; a run that fails is recorded with its error, the others go on,
    and a spent `--time-budget` starts no further run."""
    import json

    bench = _load("benchmark")
    monkeypatch.setattr(bench, "OUT", tmp_path)
    monkeypatch.setattr(bench, "build_model", lambda size: tmp_path / f"llama-{size}")
    monkeypatch.setattr(bench, "four_bit_footprint_mib", lambda model, dq, device="cpu": 1.0)
    calls = []

    def run_once(config, *args):
        calls.append(config)
        if config == "lora":
            raise RuntimeError("lora on llama-small failed (exit 1): CUDA out of memory")
        saved = json.loads((tmp_path / "results.json").read_text()) if calls[:-1] else None
        if saved:  # what ran before is already on disk when the next run starts
            assert saved["sizes"]["small"]["runs"]["qlora"]
        return _run(10, 2, 100)

    monkeypatch.setattr(bench, "run_once", run_once)
    assert bench.main(["--sizes", "small", "--configs", "qlora", "lora", "trl-default", "--rounds", "2",
                       "--no-write"]) == 0
    saved = json.loads((tmp_path / "results.json").read_text())["sizes"]["small"]
    assert calls == ["qlora", "lora", "trl-default"] * 2
    assert all("error" in r and "out of memory" in r["error"] for r in saved["runs"]["lora"])
    assert set(saved["summary"]) == {"qlora", "trl-default"} and "qlora/lora" not in saved["ratios"]
    docs = tmp_path / "docs"
    docs.mkdir()
    _load("benchmark_report").write_report(json.loads((tmp_path / "results.json").read_text()), docs)
    assert "Failed runs (left out above; errors in results.json): (d) `--strategy lora` (16-bit) 2." in (
        docs / "benchmarks.md").read_text()
    calls.clear()
    assert bench.main(["--sizes", "small", "--configs", "qlora", "--rounds", "3", "--time-budget", "0",
                       "--no-write"]) == 0
    assert calls == [] and "time budget" in json.loads((tmp_path / "results.json").read_text())["stopped"]


@pytest.mark.slow
def test_cuda_peak_runs_the_module_and_writes_the_peaks_however_it_ends(tmp_path):
    import json

    from conftest import run_python

    source = tmp_path / "in.json"
    source.write_text('{"a": 1}')
    peak = tmp_path / "peak.json"
    result = run_python([str(REPO / "examples" / "bench" / "cuda_peak.py"), "json.tool", str(source)], tmp_path,
                        env_extra={"QLORA_BENCH_PEAK_FILE": str(peak)})
    assert result.returncode == 0 and json.loads(result.stdout) == {"a": 1}  # ran as `python -m json.tool`
    assert json.loads(peak.read_text()) == {"max_memory_reserved": None, "max_memory_allocated": None}  # no CUDA
    peak.unlink()
    failed = run_python([str(REPO / "examples" / "bench" / "cuda_peak.py"), "json.tool", str(tmp_path / "nope.json")],
                        tmp_path, env_extra={"QLORA_BENCH_PEAK_FILE": str(peak)})
    assert failed.returncode != 0 and peak.exists()
