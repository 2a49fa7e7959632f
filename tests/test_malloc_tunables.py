"""glibc's malloc settings for CPU training (qlora_plugin/cpu/malloc_tunables.py): never a hidden restart. A
script runs once; `qlora-plugin run -- COMMAND` starts it with the settings; `--cpu_malloc_tunables true` (opt-in)
re-executes it once at activation, never when it cannot or should not; the user's own settings win."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import TRAIN_FLAGS, run_command, run_python, start_command
from qlora_plugin.integration import activation
from qlora_plugin.cpu import malloc_tunables as mt

OURS = ("glibc.malloc.tcache_count=0:glibc.malloc.mxfast=0:glibc.malloc.trim_threshold=536870912:"
        "glibc.malloc.mmap_threshold=33554432")
SCRIPT = ["train.py", "--strategy", "qlora"]


@pytest.mark.parametrize("current, expected", [
    (None, OURS),
    ("", OURS),
    ("glibc.malloc.arena_max=2", "glibc.malloc.arena_max=2:" + OURS),
    ("glibc.malloc.tcache_count=7", None),  # the user chose: nothing added, nothing changed
    ("glibc.malloc.mxfast=64:glibc.pthread.rseq=0", None),
    ("glibc.malloc.trim_threshold=1", None),
])
def test_settings_are_added_unless_the_user_set_them(current, expected):
    assert mt.with_settings(current) == expected


@pytest.mark.parametrize("options, expected", [
    ({}, False), ({"cpu_malloc_tunables": True}, True), ({"cpu_malloc_tunables": False}, False),
    ({"cpu_malloc_tunables": "false"}, False), ({"cpu_malloc_tunables": "no"}, False),
    ({"cpu_malloc_tunables": "yes"}, True),
])
def test_wanted_reads_the_users_value_before_the_strategy_loads(options, expected):
    assert mt.wanted(options) is expected


@pytest.fixture
def cpu_glibc(monkeypatch):
    monkeypatch.setattr(mt, "on_glibc", lambda: True)
    monkeypatch.setattr(mt, "accelerator_in_use", lambda use_cpu: None)


def test_decide_reexecutes_a_cpu_script_without_the_settings(cpu_glibc):
    go, fact = mt.decide(True, {}, True, ["python", *SCRIPT])
    assert go and fact == "re-executing with " + OURS


@pytest.mark.parametrize("enabled, environ, argv, fact_start", [
    (True, {mt.REEXEC_MARK_ENV: "1", "GLIBC_TUNABLES": OURS}, ["python", *SCRIPT],
     f"applied: GLIBC_TUNABLES={OURS} (the plugin's restart"),
    (True, {"GLIBC_TUNABLES": OURS}, ["python", *SCRIPT], f"applied: GLIBC_TUNABLES={OURS} (set at start)"),
    (True, {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=3"}, ["python", *SCRIPT], "yours kept"),
    (True, {}, None, "not applied: not a script"),
    (True, {}, ["python", "-"], "not applied: not a script"),
    (True, {}, ["python"], "not applied: not a script"),
])
def test_decide_leaves_the_process_alone(cpu_glibc, enabled, environ, argv, fact_start):
    go, fact = mt.decide(enabled, environ, True, argv)
    assert not go and fact.startswith(fact_start)


def test_decide_never_on_an_accelerator_or_off_glibc(monkeypatch):
    monkeypatch.setattr(mt, "on_glibc", lambda: True)
    monkeypatch.setattr(mt, "accelerator_in_use", lambda use_cpu: "cuda")
    assert mt.decide(True, {}, False, ["python", *SCRIPT]) == (False, "not applied: training on cuda, not CPU")
    monkeypatch.setattr(mt, "on_glibc", lambda: False)
    go, fact = mt.decide(True, {}, True, ["python", *SCRIPT])
    assert not go and "glibc only" in fact


@pytest.mark.parametrize("argv, from_stdin", [
    (["python", "train.py", "--x"], False), (["python", "-m", "trl.scripts.sft"], False),
    (["python", "-c", "import trl"], False), (["python", "-X", "dev", "-u", "train.py"], False),
    (["python", "-"], True), (["python", "-u"], True),
])
def test_scripts_read_from_stdin_are_recognised(argv, from_stdin):
    assert mt._script_from_stdin(argv) is from_stdin


@pytest.mark.parametrize("argv, yaml, use_cpu", [
    (["--use_cpu"], None, True), (["--use_cpu", "true"], None, True), (["--use_cpu", "false"], None, False),
    (["--use_cpu=False"], None, False), (["--use-cpu", "--x", "1"], None, True), ([], None, False),
    ([], "use_cpu: true\n", True), (["--use_cpu", "false"], "use_cpu: true\n", False),
])
def test_use_cpu_is_read_from_the_command_line_and_yaml(tmp_path, argv, yaml, use_cpu):
    if yaml is not None:
        (tmp_path / "c.yaml").write_text(yaml)
        argv = ["--config", str(tmp_path / "c.yaml"), *argv]
    assert activation._use_cpu(argv) is use_cpu


def _probe(tmp_path):
    """A script that logs (pid, GLIBC_TUNABLES) each time it starts, then imports trl (the activation)."""
    script = tmp_path / "probe.py"
    script.write_text(
        "import json, os, sys\n"
        "with open(os.environ['PROBE_LOG'], 'a') as f:\n"
        "    f.write(json.dumps([os.getpid(), os.environ.get('GLIBC_TUNABLES')]) + '\\n')\n"
        "import trl\n"
        "from qlora_plugin.cpu import malloc_tunables\n"
        "print('FACT', malloc_tunables.summary_fact())\n"
        "print('ARGV', sys.argv[1:])\n"
    )
    return script


def _starts(log):
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.mark.slow
def test_a_cpu_script_runs_once_by_default(tmp_path):
    """Everything above `import trl` (prints, file appends, run ids) happens once: no restart behind the user's back."""
    script, log = _probe(tmp_path), tmp_path / "starts.log"
    proc = run_python([str(script), "--strategy", "qlora", "--use_cpu"], tmp_path,
                      {"PROBE_LOG": str(log), "GLIBC_TUNABLES": ""})
    assert proc.returncode == 0, proc.stderr
    assert len(_starts(log)) == 1
    assert "FACT not applied: glibc's defaults; start the command with `qlora-plugin run -- COMMAND`" in proc.stdout


@pytest.mark.slow
def test_the_launcher_starts_the_command_once_with_the_settings(tmp_path):
    script, log = _probe(tmp_path), tmp_path / "starts.log"
    proc = start_command(["qlora-plugin", "run", "--", sys.executable, str(script), "--strategy", "qlora",
                          "--use_cpu"], tmp_path, {"PROBE_LOG": str(log), "GLIBC_TUNABLES": ""})
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert _starts(log) == [[proc.pid, OURS]]  # once, as the launcher's own process (exec), with the settings
    assert f"FACT applied: GLIBC_TUNABLES={OURS} (set at start)" in stdout


@pytest.mark.parametrize("argv, message", [
    (["run"], "`qlora-plugin run` needs a command"),
    (["run", "--", "no-such-command-here"], "`qlora-plugin run` could not start 'no-such-command-here'"),
])
@pytest.mark.slow
def test_the_launcher_without_a_command_it_can_start(tmp_path, argv, message):
    proc = run_command(["qlora-plugin", *argv], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"qlora-plugin: error: {message}" in proc.stderr


@pytest.mark.slow
def test_opting_in_reexecutes_once_as_the_same_process_with_the_settings(tmp_path):
    script, log = _probe(tmp_path), tmp_path / "starts.log"
    proc = run_python([str(script), "--strategy", "qlora", "--use_cpu", "--cpu_malloc_tunables", "true", "--other",
                       "1"], tmp_path, {"PROBE_LOG": str(log), "GLIBC_TUNABLES": ""})
    assert proc.returncode == 0, proc.stderr
    starts = _starts(log)
    assert len(starts) == 2  # started, then re-executed once (not again)
    assert starts[0][0] == starts[1][0]  # execv: the same process id
    assert starts[0][1] == "" and starts[1][1] == OURS
    assert f"FACT applied: GLIBC_TUNABLES={OURS} (the plugin's restart, cpu_malloc_tunables)" in proc.stdout
    assert "ARGV ['--use_cpu', '--other', '1']" in proc.stdout  # arguments intact, plugin flags taken out


@pytest.mark.slow
def test_opting_in_over_the_users_own_settings_keeps_them(tmp_path):
    script, log = _probe(tmp_path), tmp_path / "starts.log"
    mine = "glibc.malloc.tcache_count=3"
    proc = run_python([str(script), "--strategy", "qlora", "--use_cpu", "--cpu_malloc_tunables", "true"], tmp_path,
                      {"PROBE_LOG": str(log), "GLIBC_TUNABLES": mine})
    assert proc.returncode == 0, proc.stderr
    assert _starts(log)[0][1] == mine and len(_starts(log)) == 1
    assert f"FACT yours kept: GLIBC_TUNABLES={mine}" in proc.stdout


@pytest.mark.slow
def test_without_a_strategy_nothing_happens(tmp_path):
    script, log = _probe(tmp_path), tmp_path / "starts.log"
    proc = run_python([str(script), "--use_cpu", "--cpu_malloc_tunables", "true"], tmp_path,
                      {"PROBE_LOG": str(log), "GLIBC_TUNABLES": ""})
    assert proc.returncode == 0 and len(_starts(log)) == 1


@pytest.mark.slow
def test_a_user_error_is_still_reported_once_after_reexecution(tmp_path):
    script, log = _probe(tmp_path), tmp_path / "starts.log"
    proc = run_python([str(script), "--strategy", "qlora", "--use_cpu", "--cpu_malloc_tunables", "true", "--lora_r",
                       "-3"], tmp_path, {"PROBE_LOG": str(log), "GLIBC_TUNABLES": ""})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.count("lora_r") >= 1 and len(_starts(log)) == 2


@pytest.mark.parametrize("launcher, line, fact", [
    ([], "host malloc: glibc's defaults; about a third lower peak memory on CPU when started with `qlora-plugin run",
     "not applied: glibc's defaults; start the command with `qlora-plugin run -- COMMAND`"),
    (["qlora-plugin", "run", "--"], "host malloc: glibc small-block caches off, 512 MiB kept at the heap top",
     f"applied: GLIBC_TUNABLES={OURS} (set at start)"),
])
@pytest.mark.slow
def test_training_script_reports_the_settings(tiny_models, dataset_dir, tmp_path, launcher, line, fact):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "trl.scripts.sft", "--model_name_or_path", tiny_models["llama"],
               "--dataset_name", dataset_dir, "--strategy", "qlora", "--output_dir", str(out), *TRAIN_FLAGS]
    if launcher:
        proc = run_command([*launcher, *command], tmp_path, {"GLIBC_TUNABLES": ""})
    else:
        proc = run_python(command[1:], tmp_path, {"GLIBC_TUNABLES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert line in proc.stdout + proc.stderr
    report = json.loads((out / "qlora_plugin_report.json").read_text())
    assert report["runtime"]["malloc_tunables"].startswith(fact)


def test_asking_for_it_where_it_cannot_act_is_said(tiny_models, tmp_path, monkeypatch):
    """Python API: no command line to re-execute, so an explicit `true` becomes a 'fell back' line."""
    from datasets import load_dataset
    from trl import SFTConfig

    from conftest import DATA
    from qlora_plugin import apply_strategy

    monkeypatch.setattr(mt, "outcome", None)
    monkeypatch.setenv("GLIBC_TUNABLES", "")
    args = SFTConfig(output_dir=str(tmp_path), max_steps=1, report_to="none", use_cpu=True, max_length=32)
    kwargs = apply_strategy({"model": tiny_models["llama"], "args": args,
                             "train_dataset": load_dataset(str(DATA))["train"]}, "qlora",
                            options={"cpu_malloc_tunables": True})
    report = next(c for c in kwargs["callbacks"] if type(c).__name__ == "StrategyReportCallback")
    assert report.facts["runtime"]["malloc_tunables"].startswith("not applied: glibc's defaults; start the command")
    assert any(note.startswith("cpu_malloc_tunables not applied") for note in report.facts["fallbacks"])
