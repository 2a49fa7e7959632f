"""The supported range of each dependency (pyproject.toml): checked at activation only when a strategy is requested,
one line for an unsupported or broken release, `qlora-plugin doctor`, and the floor environment of `make
test-floor` really holding the floors. All in-process, with the version lookup replaced."""

from __future__ import annotations

import importlib.metadata
import os
import re
import sys
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from qlora_plugin.ecosystem import compat
from qlora_plugin.core.errors import QLoRAPluginError
from qlora_plugin.integration import activation, state

from conftest import REPO


def _older(name: str, real=compat.installed_version):
    """A version lookup that reports `name` one minor release below its floor (others as installed)."""
    floor = Version(compat.supported_ranges()[name].removeprefix(">="))
    older = f"{floor.major}.{floor.minor - 1}.0" if floor.minor else f"{floor.major - 1}.99.0"
    return older, lambda library: older if library == name else real(library)


@pytest.fixture
def script(monkeypatch, tmp_path):
    """Run the activation of `python sft.py ARGV` in-process (what `import trl` runs)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delattr(sys, "_qlora_plugin_own_cli", raising=False)

    def run(argv):
        monkeypatch.setattr(sys, "argv", ["sft.py", *argv])
        activation.activate_from_process()

    return run


def test_the_range_is_the_declared_dependencies():
    """One source of truth: compat reads the same `>=` floors pip installs against."""
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    expected = {Requirement(d).name: str(Requirement(d).specifier) for d in declared
                if Requirement(d).name in compat.LIBRARIES}
    assert compat.supported_ranges() == expected, "the installed metadata is older than pyproject.toml: make setup"
    assert set(expected) == set(compat.LIBRARIES)


@pytest.mark.floor
def test_the_installed_releases_pass_the_activation_check():
    compat.check_at_activation()  # raises on an unsupported release or a missing internal


@pytest.mark.parametrize("library", ["transformers", "trl", "bitsandbytes"])
def test_an_unsupported_release_ends_a_strategy_run_in_one_line(library, script, monkeypatch, capsys):
    older, lookup = _older(library)
    monkeypatch.setattr(compat, "installed_version", lookup)
    with pytest.raises(SystemExit) as exit_:
        script(["--strategy", "qlora", "--model_name_or_path", "m"])
    err = capsys.readouterr().err
    spec = compat.supported_ranges()[library]
    assert exit_.value.code == 2
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{library} {older} is not supported" in err and f"supported: {library}{spec}" in err, err
    assert f"pip install '{library}{spec}'" in err, err
    assert state.active_request() is None  # nothing was patched or activated


def test_a_missing_library_names_the_install(monkeypatch):
    monkeypatch.setattr(compat, "installed_version", lambda name: None if name == "peft" else "99.0")
    with pytest.raises(QLoRAPluginError, match=r"^peft is not installed; .* Fix: pip install 'peft>=[0-9.]+'$"):
        compat.check_versions(compat.installed_version)


def test_without_a_strategy_nothing_is_checked(script, monkeypatch):
    def refuse(name):
        raise AssertionError(f"{name} looked up without a strategy")

    monkeypatch.setattr(compat, "installed_version", refuse)
    monkeypatch.setattr(compat, "check_internals", lambda: refuse("internals"))
    script(["--model_name_or_path", "m"])
    assert state.active_request() is None


def test_a_release_without_an_internal_the_patches_use_is_named(monkeypatch, script, capsys):
    """A release inside the range that lost a private name (renamed upstream): one line, not a traceback from
    inside a patch."""
    gone = ("transformers", "transformers.trainer", "Trainer._save_checkpoint_renamed", "atomic checkpoints")
    monkeypatch.setattr(compat, "INTERNALS", (*compat.INTERNALS, gone))
    with pytest.raises(SystemExit) as exit_:
        script(["--strategy", "qlora"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1, err
    assert re.search(r"transformers \S+ is not supported by qlora-plugin \(`transformers\.trainer\.Trainer\."
                     r"_save_checkpoint_renamed`, needed for atomic checkpoints, is missing\); supported: "
                     r"transformers>=[0-9.]+\. Fix: pip install 'transformers>=[0-9.]+,<[0-9.]+', or a qlora-plugin "
                     r"release that supports transformers \S+$", err), err


def test_the_python_api_checks_too(monkeypatch):
    from qlora_plugin import apply_strategy

    older, lookup = _older("accelerate")
    monkeypatch.setattr(compat, "installed_version", lookup)
    with pytest.raises(QLoRAPluginError, match=f"accelerate {older} is not supported"):
        apply_strategy({"model": "m"}, "qlora")


@pytest.mark.floor
def test_doctor_lists_each_library_and_says_it_is_supported(capsys):
    from qlora_plugin.cli import main

    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for name in compat.LIBRARIES:
        found = importlib.metadata.version(name)
        assert re.search(rf"^{name}\s+{re.escape(found)}\s+>=\S+\s+ok$", out, re.M), out
    assert "every library is in the supported range" in out


def test_doctor_marks_an_unsupported_release(monkeypatch, capsys):
    from qlora_plugin.cli import main

    older, lookup = _older("peft")
    monkeypatch.setattr(compat, "installed_version", lookup)
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert re.search(rf"^peft\s+{re.escape(older)}\s+>=\S+\s+UNSUPPORTED$", out, re.M), out
    assert f"qlora-plugin: peft {older} is not supported" in out and "would refuse to start" in out


@pytest.mark.floor
@pytest.mark.skipif(not os.environ.get("QLORA_PLUGIN_FLOOR_ENV"), reason="the floor environment only (make test-floor)")
def test_the_floor_environment_holds_the_floors():
    """In `make test-floor`, every runtime dependency is its floor's release series (torch: the one CPU build the
    Makefile pins, QLORA_PLUGIN_FLOOR_TORCH)."""
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for dependency in declared:
        requirement = Requirement(dependency)
        installed = Version(importlib.metadata.version(requirement.name))
        if requirement.name == "torch":
            assert installed.public == os.environ["QLORA_PLUGIN_FLOOR_TORCH"], installed
            continue
        floor = Version(next(s.version for s in requirement.specifier if s.operator == ">="))
        assert (installed.major, installed.minor) == (floor.major, floor.minor), f"{dependency}: {installed}"
