"""Keep hooks, docs and tests in step: every hook is documented and tested; the options table is generated."""

from __future__ import annotations

import inspect

import pytest

from conftest import REPO

from qlora_plugin.plugin import specs as hookspecs
from qlora_plugin.core.options import options_reference_markdown
from qlora_plugin.plugin.manager import collect_options, get_plugin_manager

HOOKS = sorted(name for name, obj in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("qlora_"))


def _recorder(calls: list):
    """A plugin implementing every spec in `specs.py`, each recording that it was called and answering nothing."""
    plugin = type("Recorder", (), {})()
    for name in HOOKS:
        def impl(name=name):
            calls.append(name)
        impl.__name__ = name
        setattr(plugin, name, hookspecs.hookimpl(staticmethod(impl).__func__))
    return plugin


def test_every_hook_has_a_docs_section_with_its_signature():
    docs = (REPO / "docs" / "hooks.md").read_text()
    for name in HOOKS:
        assert f"\n## {name}\n" in docs, name
        params = ", ".join(inspect.signature(getattr(hookspecs, name)).parameters)
        assert f"`{name}({params})`" in docs, name


def test_one_run_calls_every_hook_in_the_documented_order(tiny_models, tmp_path):
    """A plugin answering every spec, in a real run: each hook is called (none is dead, none missing from
    `specs.py`), in the order docs/hooks.md's table gives."""
    from datasets import load_dataset
    from trl import SFTConfig

    from conftest import DATA
    from qlora_plugin import get_plugin_manager, make_trainer

    calls = []
    pm = get_plugin_manager(load_entrypoints=False)
    pm.register(_recorder(calls), name="recorder")
    make_trainer("qlora", plugin_manager=pm, model=tiny_models["llama"], train_dataset=load_dataset(str(DATA))["train"],
                 args=SFTConfig(output_dir=str(tmp_path), max_steps=1, report_to="none", use_cpu=True,
                                save_strategy="no", max_length=32))
    docs = (REPO / "docs" / "hooks.md").read_text()
    documented = [row.split("`")[1] for row in docs.split("| # | hook |")[1].split("\n\n")[0].splitlines()[2:]]
    assert sorted(documented) == HOOKS
    assert list(dict.fromkeys(calls)) == documented


@pytest.mark.floor
def test_the_installed_libraries_satisfy_the_declared_range():
    """Every runtime dependency declares one `>=` floor, and the environment the suite runs in satisfies every
    declared range (a fresh install takes the newest releases; the floor environment, `make test-floor`, the
    floors)."""
    import importlib.metadata
    import tomllib

    from packaging.requirements import Requirement
    from packaging.version import Version

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for dependency in project["dependencies"]:
        requirement = Requirement(dependency)
        assert len([s for s in requirement.specifier if s.operator == ">="]) == 1, f"{dependency}: give one >= floor"
        installed = Version(importlib.metadata.version(requirement.name))
        assert requirement.specifier.contains(installed, prereleases=True), f"{dependency}: installed {installed}"


def test_options_reference_is_generated_from_the_dataclass():
    docs = (REPO / "docs" / "options.md").read_text()
    block = docs.split("<!-- options-table:start -->\n")[1].split("<!-- options-table:end -->")[0]
    built_in = collect_options(get_plugin_manager(load_entrypoints=False))  # the default plugins' options
    assert {o.name for o in built_in} == {"cpu_fast_dropout", "cpu_dequant_buffer"}
    assert block == options_reference_markdown(built_in), "regenerate with `qlora-plugin options`"


def _lint_imports(root):
    import os
    import subprocess
    import sys
    from pathlib import Path

    lint = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(root)}  # this tree's package, not the installed one
    return subprocess.run([str(lint), "--no-cache"], cwd=root, capture_output=True, text=True, env=env)


@pytest.mark.slow
def test_layer_contracts_hold_and_catch_an_upward_import(tmp_path):
    """`lint-imports` (run by `make test`) keeps the layers; an import from plan into integration breaks them."""
    import shutil

    proc = _lint_imports(REPO)
    assert proc.returncode == 0, proc.stdout[-2000:]
    copy = tmp_path / "repo"
    shutil.copytree(REPO / "qlora_plugin", copy / "qlora_plugin", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", copy / "pyproject.toml")
    skeleton = copy / "qlora_plugin" / "plan" / "skeleton.py"
    skeleton.write_text(skeleton.read_text() + "\n\ndef _late():\n    from qlora_plugin.integration import activation\n")
    proc = _lint_imports(copy)
    assert proc.returncode != 0
    assert "qlora_plugin.plan.skeleton -> qlora_plugin.integration.activation" in proc.stdout


def test_no_import_cycle_between_modules():
    """Every import counts, inside functions too (grimp reads them all): the module graph has no cycle."""
    import grimp

    graph = grimp.build_graph("qlora_plugin", cache_dir=None)
    modules = sorted(graph.modules)
    edges = {m: {d for d in graph.find_modules_directly_imported_by(m) if d in graph.modules and d != m}
             for m in modules}
    edges = {m: {d for d in targets if not m.startswith(d + ".")} for m, targets in edges.items()}  # parent pkgs
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(node):  # Tarjan's strongly connected components
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in edges[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in modules:
        if module not in index:
            visit(module)
    assert cycles == []


def test_boolean_flags_take_the_words_trl_takes():
    """`flags.parse_bool` (stdlib only, for activation) accepts and refuses exactly what transformers' does."""
    import argparse

    import pytest
    from transformers.hf_argparser import string_to_bool

    from qlora_plugin.core.flags import parse_bool

    for word in ("yes", "True", "T", "y", "1", "no", "FALSE", "f", "N", "0", " true ", "maybe", "", "2", "on"):
        try:
            expected = string_to_bool(word.strip())
        except argparse.ArgumentTypeError:
            with pytest.raises(argparse.ArgumentTypeError):
                parse_bool(word)
        else:
            assert parse_bool(word) is expected, word
