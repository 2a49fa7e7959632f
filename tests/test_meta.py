"""Keep hooks, docs and tests in step: every hook is documented and tested; the options table is generated."""

from __future__ import annotations

import inspect

from conftest import REPO

from qlora_plugin import hookspecs
from qlora_plugin.options import options_reference_markdown

HOOKS = sorted(name for name, obj in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("qlora_"))


def test_there_are_hooks():
    assert HOOKS == ["qlora_create_optimizer", "qlora_model_init_kwargs", "qlora_register_strategies",
                     "qlora_trainer_callbacks", "qlora_wrap_model"]


def test_every_hook_has_a_docs_section_with_its_signature():
    docs = (REPO / "docs" / "hooks.md").read_text()
    for name in HOOKS:
        assert f"\n## {name}\n" in docs, name
        params = ", ".join(inspect.signature(getattr(hookspecs, name)).parameters)
        assert f"`{name}({params})`" in docs, name


def test_every_hook_is_exercised_by_a_test():
    tests = "".join(p.read_text() for p in (REPO / "tests").glob("test_*.py") if p.name != "test_meta.py")
    hooks = "".join(p.read_text() for p in (REPO / "hooks").glob("*.py"))
    for name in HOOKS:
        assert name in tests or name in hooks, f"{name} is used by no test or tested hook file"


def test_options_reference_is_generated_from_the_dataclass():
    docs = (REPO / "docs" / "options.md").read_text()
    block = docs.split("<!-- options-table:start -->\n")[1].split("<!-- options-table:end -->")[0]
    assert block == options_reference_markdown(), "regenerate with `qlora-plugin options`"
