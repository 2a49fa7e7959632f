"""docs/merge.md's worked example is a recorded run, not hand-typed figures: the block is regenerated here from
docs/runs/merge_example.json with the command's own formatting, and the recorded run has the shape today's merge
returns, so a change to the output or a hand edit fails until `python examples/bench/merge_example.py ...` is run again."""

from __future__ import annotations

import json
import sys

from conftest import REPO

from qlora_plugin import cli

sys.path.insert(0, str(REPO / "examples"))
sys.path.insert(0, str(REPO / "examples" / "bench"))
import merge_example  # noqa: E402


def recorded() -> dict:
    return json.loads(merge_example.RECORD.read_text())


def test_the_worked_example_is_the_recorded_run():
    text = (REPO / "docs" / "merge.md").read_text()
    block = text.split(merge_example.START + "\n", 1)[1].split(merge_example.END, 1)[0]
    assert block == merge_example.render(recorded())


def test_the_recorded_run_has_the_shape_merge_returns_today(tiny_models, tmp_path, capsys):
    """The recorded summary and report have the keys a merge returns now (a renamed or added figure must be
    re-recorded), and what the command prints is what `render` shows for it."""
    from test_merge import crafted_adapter

    adapter = crafted_adapter(tiny_models["llama"], tmp_path / "adapter", target_modules="all-linear")
    out = tmp_path / "merged"
    assert cli.main(["merge", "--adapter", adapter, "--out", str(out), "--dtype", "bfloat16"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "merge_report.json").read_text())
    marker = json.loads((out / "qlora_plugin_merge.json").read_text())
    summary = {**marker, "out": str(out), "fidelity": report}
    summary.pop("written_by"), summary.pop("adapter")
    record = recorded()["summary"]

    def shape(value):
        return {k: shape(v) for k, v in value.items()} if isinstance(value, dict) else type(value).__name__

    assert shape(record["fidelity"]) == shape(report) and record.keys() == summary.keys()
    rendered = merge_example.render({"command": "", "about": "", "summary": summary})
    assert rendered.split("```\n")[2].strip() == printed.strip()
