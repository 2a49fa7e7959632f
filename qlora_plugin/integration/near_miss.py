"""Misspelled plugin keys, caught whether or not a strategy is active (standard library only: it runs in every
process that imports `trl`, before anything is loaded).

Without a strategy the plugin stays out of the way, so `stratgy: qlora` in a YAML recipe, `--stratgy qlora` or
`-strategy qlora` on the command line, or `QLORA_PLUGN_STRATEGY` in an `env:` block would train a full,
unquantized model and exit 0: TRL drops unknown YAML keys and its scripts ignore unknown flags. A name is a near
miss when it is not exactly one of ours but differs from one by its case, `-` for `_`, its leading dashes (or a
typographic dash), or one typo (a letter missing, added, changed, or two swapped; two typos for names longer
than 10 characters). That cutoff keeps scripts' own flags out (`--stratify` is two typos from `--strategy`,
TRL's `--save_strategy` four).
"""

from __future__ import annotations

import re

from qlora_plugin.core.errors import QLoRAPluginError

OWN_FLAGS = ("strategy", "qlora_hooks")  # command-line flags and YAML keys read before any strategy is known
DASHES = "-\u2010\u2011\u2012\u2013\u2014\u2015\u2212"  # ASCII and typographic dashes (text pasted from a page)


def _typos(a: str, b: str, limit: int) -> int:
    """The optimal string alignment distance of `a` and `b` (Damerau-Levenshtein without repeated edits), or
    `limit + 1` as soon as it must exceed `limit`."""
    if abs(len(a) - len(b)) > limit:
        return limit + 1
    before, row = None, list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            cost = min(row[j] + 1, current[j - 1] + 1, row[j - 1] + (x != y))
            if before is not None and i > 1 and j > 1 and x == b[j - 2] and a[i - 2] == y:
                cost = min(cost, before[j - 2] + 1)
            current.append(cost)
        if min(current) > limit:
            return limit + 1
        before, row = row, current
    return row[-1]


def close_to(name: str, ours: str) -> bool:
    """`name` (already in `ours`' case and with `_` for `-`) is `ours` or one of its near misses."""
    limit = 1 if len(ours) <= 10 else 2
    return name == ours or _typos(name, ours, limit) <= limit


def _flag_problem(token: str) -> str | None:
    """What is wrong with one command-line token that looks like a misspelled `--strategy` / `--qlora_hooks`."""
    stripped = token.lstrip(DASHES)
    dashes = token[: len(token) - len(stripped)]
    if not dashes or not stripped:
        return None
    name = re.match(r"[\w-]*", stripped).group()
    rest = stripped[len(name):]
    canonical = name.lower().replace("-", "_")
    for ours in OWN_FLAGS:
        exact = dashes == "--" and name in (ours, ours.replace("_", "-")) and rest[:1] in ("", "=")
        if exact or not close_to(canonical, ours):
            continue
        value = rest[1:] if rest else ""
        right = f"--{ours}" + (f" {value}" if value and rest[0] != "=" else rest)
        return f"`{token}`: did you mean `{right}`?"
    return None


def command_line_problems(argv: list[str]) -> list[str]:
    problems = []
    for token in argv:
        if token == "--":
            break  # what follows is positional
        problem = _flag_problem(token)
        if problem:
            problems.append(problem)
    return problems


def key_problems(keys, candidates, where: str, upper: bool = False, known=()) -> list[str]:
    """Keys of a YAML mapping or an environment that are near misses of `candidates` (and exactly none of them,
    nor of the `known` names the plugin also uses)."""
    problems = []
    for key in keys:
        if not isinstance(key, str) or key in candidates or key in known:
            continue
        canonical = key.replace("-", "_")
        canonical = canonical.upper() if upper else canonical.lower()
        close = [ours for ours in candidates if close_to(canonical, ours)]
        if close:
            problems.append(f"`{key}` {where}: did you mean `{close[0]}`?")
    return problems


def check(problems: list[str]) -> None:
    """Raise one error for every near miss found (none: nothing happens)."""
    if problems:
        raise QLoRAPluginError(
            "Misspelled qlora-plugin setting(s): " + " ".join(problems) + " As written they are ignored, and the "
            "run would go without the strategy or hook files you meant. Fix the spelling (a flag that is your own "
            "script's: rename it, or run without qlora-plugin with QLORA_PLUGIN_DISABLE=1)."
        )
