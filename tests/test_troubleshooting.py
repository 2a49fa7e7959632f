"""docs/troubleshooting.md's bad-input table is the single list of handled bad input: every row names a test
that exists and asserts the row's quoted message, and every bad-input test has a row."""

from __future__ import annotations

import importlib
import re

from conftest import REPO

HEADER = "| where | bad input | what you see (message excerpt) | test |"
BAD_INPUT_FILES = ("test_bad_input.py", "test_hostile_input.py")


def table_rows() -> list[list[str]]:
    docs = (REPO / "docs" / "troubleshooting.md").read_text()
    block = docs.split("<!-- bad-input-table:start -->\n")[1].split("<!-- bad-input-table:end -->")[0]
    lines = block.strip().splitlines()
    assert lines[0] == HEADER and lines[1] == "|---|---|---|---|"
    rows = [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines[2:]]
    assert all(len(row) == 4 for row in rows), [row for row in rows if len(row) != 4]
    return rows


def ids_in(file: str) -> set[str]:
    """pytest ids of the tests in tests/FILE: `name`, or `name[param]` for each parameter (dict keys here)."""
    module = importlib.import_module(file.removesuffix(".py"))
    ids = set()
    for name, function in vars(module).items():
        if not (name.startswith("test_") and callable(function)):
            continue
        marks = [m for m in getattr(function, "pytestmark", []) if m.name == "parametrize"]
        ids |= {f"{name}[{value}]" for m in marks for value in m.args[1]} if marks else {name}
    return ids


def named_tests() -> list[tuple[str, str, list[str]]]:
    """(file, test id, quoted message fragments) for each row."""
    named = []
    for where, bad_input, message, test in table_rows():
        match = re.fullmatch(r"`tests/(test_\w+\.py)::(\w+(?:\[[^\]]+\])?)`", test)
        assert match, f"row {bad_input!r}: the test column must be `tests/FILE::TEST_ID`, got {test!r}"
        named.append((match[1], match[2], re.findall(r'"([^"]+)"', message)))
    return named


def test_every_row_quotes_what_the_user_sees_once():
    """Each row quotes the message it documents (what the named test asserts), and no bad input is listed twice:
    the table is a list of distinct messages, not a count to reach."""
    rows = table_rows()
    unquoted = [bad for _, bad, message, _ in rows if not re.findall(r'"([^"]+)"', message)
                and "not bad input" not in bad and "is not bad input" not in bad]
    assert unquoted == [], "quote the message excerpt in double quotes"
    seen = [(where, bad) for where, bad, _, _ in rows]
    assert sorted(k for k in set(seen) if seen.count(k) > 1) == []


def test_every_named_test_exists_and_asserts_the_message():
    for file, test_id, fragments in named_tests():
        assert test_id in ids_in(file), f"{file}::{test_id} does not exist"
        source = (REPO / "tests" / file).read_text()
        for fragment in fragments:
            assert fragment in source, f"{file}::{test_id} does not assert {fragment!r}"


def test_every_bad_input_test_is_in_the_table():
    listed = {(file, test_id) for file, test_id, _ in named_tests()}
    missing = sorted(f"{file}::{test_id}" for file in BAD_INPUT_FILES for test_id in ids_in(file)
                     if (file, test_id) not in listed)
    assert missing == [], "add a row to docs/troubleshooting.md for each"
    assert len(listed) == len(named_tests()), "a test is named by two rows"
