"""The demo's task (`examples/data/contact_json`) and the demo itself (`make demo`, examples/demo.py).

The task must be one a 135M model can learn from the text alone: every answer is copied from its sentence, and the
held-out split shares no name or city with training, so exact match there is the skill, not recall."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from conftest import REPO

DATA = REPO / "examples" / "data" / "contact_json"


def rows(split: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / f"{split}.jsonl").read_text().splitlines()]


def test_the_files_are_what_the_builder_writes():
    sys.path.insert(0, str(DATA))
    try:
        import build
    finally:
        sys.path.remove(str(DATA))
    train, test = build.build()
    assert (train, test) == (rows("train"), rows("test"))


def test_every_answer_is_in_its_text_and_held_out_values_are_new():
    def fields(row):
        text = row["prompt"][0]["content"].splitlines()[1]
        answer = json.loads(row["completion"][0]["content"])
        assert list(answer) == ["name", "age", "city"] and isinstance(answer["age"], int)
        assert answer["name"] in text and answer["city"] in text and str(answer["age"]) in text, (text, answer)
        return answer

    train, test = [fields(r) for r in rows("train")], [fields(r) for r in rows("test")]
    assert len(train) >= 100 and len(test) >= 30
    assert not {a["city"] for a in train} & {a["city"] for a in test}
    first = {a["name"].split()[0] for a in train}, {a["name"].split()[0] for a in test}
    last = {a["name"].split()[1] for a in train}, {a["name"].split()[1] for a in test}
    assert not first[0] & first[1] and not last[0] & last[1]


def test_the_score_is_an_exact_match_of_the_parsed_json():
    """The demo's metric: the reply's JSON must equal the expected object; key order and spacing do not decide,
    a wrong value, a wrong type, an extra key or any text around the object do."""
    sys.path.insert(0, str(REPO / "examples"))
    try:
        import demo
    finally:
        sys.path.remove(str(REPO / "examples"))
    want = '{"name": "Sami Volkova", "age": 68, "city": "Tampere"}'
    assert demo.right(want, want)
    assert demo.right('{"city":"Tampere","age":68,\n "name":"Sami Volkova"}', want)
    for wrong in ('{"name": "Sami Volkova", "age": 68, "city": "Tamper"}',
                  '{"name": "Sami Volkova", "age": "68", "city": "Tampere"}',
                  '{"name": "Sami Volkova", "age": 68, "city": "Tampere", "country": "Finland"}',
                  'Sure! {"name": "Sami Volkova", "age": 68, "city": "Tampere"}',
                  '{"name": "Sami Volkova", "age": 68, "city": "Tam',
                  'Sami Volkova, 68, flew in from Tampere.'):
        assert not demo.right(wrong, want), wrong
    assert demo.exact([want, "no", want], [want] * 3) == 2


@pytest.mark.slow
def test_the_demo_learns_the_task(tmp_path):
    """The whole demo as `make demo` runs it: held-out exact match near zero before, and after training at least
    90%, the aim, a guard against regressions below the measured figures (docs/getting-started.md: 37/40 and, with
    TRL's seed 43, 38/40 on 2026-12-06)."""
    done = subprocess.run([sys.executable, str(REPO / "examples" / "demo.py")], cwd=REPO, capture_output=True,
                          text=True, timeout=3600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    match = re.search(r"exact match\s+: (\d+)/(\d+) held-out before -> (\d+)/(\d+) after", done.stdout)
    assert match, done.stdout[-3000:]
    before, n, after, _ = map(int, match.groups())
    print(match.group(0))
    assert n == len(rows("test")) and before <= 0.1 * n and after >= 0.9 * n
