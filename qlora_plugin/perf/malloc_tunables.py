"""Start CPU training scripts with glibc's caches of small freed blocks turned off (`cpu_malloc_tunables`).

Why: glibc keeps small freed blocks (up to 1 KiB) in per-thread caches (tcache) and fastbins, and to their
neighbours such blocks still count as in use. Training on CPU frees large tensor blocks all the time; when a
cached small block sits between two of them they cannot merge, and the next dequantized weight or activation
that no longer fits in either half is taken from fresh memory at the top of the heap, which grows to several
times what is in use. With both caches off the blocks merge, but the merged memory then reaches the heap's top
and glibc hands it back to the kernel, only to fault it in again for the next layer (slower steps); keeping up
to 512 MiB at the top stops that. With all four settings below the peak falls by about a third with steps as
fast as glibc's defaults (docs/architecture.md, Decisions, and docs/benchmarks.md have the measurements).

How: glibc reads `GLIBC_TUNABLES` only when a process starts. So when a strategy activates in a script on a
CPU-only run, the plugin re-executes the same command once, before anything is loaded, with the two settings
added to the environment. `execv` keeps the process id, open files and arguments (launchers that wait on the
process see no difference); the cost is importing Python packages a second time (more without `--use_cpu`,
where torch is imported to see that no accelerator is in use).

Never done: inside an interactive session or notebook, for a script read from stdin, when a GPU (or another
accelerator) is in use, off glibc, or when `GLIBC_TUNABLES` already sets either of these (your settings win).
Off with `--cpu_malloc_tunables false`.
"""

from __future__ import annotations

import logging
import os
import platform
import sys

from qlora_plugin.plugin.specs import hookimpl

logger = logging.getLogger(__name__)

TUNABLES_ENV = "GLIBC_TUNABLES"
# Both small-block caches off, so freed blocks merge with their neighbours at once; up to 512 MiB kept free at
# the heap's top instead of returned and faulted in again; and the mmap threshold fixed at 32 MiB, the ceiling of
# glibc's moving threshold (setting trim_threshold stops it moving, and at its 128 KiB start every tensor would
# be mapped afresh).
SETTINGS = (
    ("glibc.malloc.tcache_count", "0"),
    ("glibc.malloc.mxfast", "0"),
    ("glibc.malloc.trim_threshold", str(512 * 2**20)),
    ("glibc.malloc.mmap_threshold", str(32 * 2**20)),
)
REEXEC_MARK_ENV = "QLORA_PLUGIN_MALLOC_REEXEC"  # set in the re-executed process: never re-execute twice

outcome: str | None = None  # what `apply_at_activation` decided in this process


def with_settings(current: str | None) -> str | None:
    """`current` GLIBC_TUNABLES with SETTINGS added; None when it already sets any of them (the user's win)."""
    entries = [e for e in (current or "").split(":") if e]
    names = {e.split("=", 1)[0] for e in entries}
    if any(name in names for name, _ in SETTINGS):
        return None
    return ":".join(entries + [f"{name}={value}" for name, value in SETTINGS])


def wanted(explicit_options: dict) -> bool:
    """The user's `cpu_malloc_tunables` (default on), read before the strategy loads; a malformed value is
    reported by the strategy's option check just after."""
    value = explicit_options.get("cpu_malloc_tunables", True)
    if isinstance(value, str):
        return value.strip().lower() not in ("false", "f", "no", "n", "0")
    return value is not False


def on_glibc() -> bool:
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def _interactive() -> bool:
    return bool(sys.flags.interactive) or hasattr(sys, "ps1") or "ipykernel" in sys.modules


def _script_from_stdin(orig_argv: list[str]) -> bool:
    """`python - < train.py` or `python < train.py`: stdin is consumed and cannot be read again."""
    args = orig_argv[1:]
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-c", "-m"):
            return False
        if arg == "-":
            return True
        if not arg.startswith("-"):
            return False  # the script file
        i += 2 if arg in ("-W", "-X", "--check-hash-based-pycs") else 1
    return True


def accelerator_in_use(use_cpu: bool) -> str | None:
    """The accelerator this run trains on, or None for CPU (`--use_cpu`, or none present)."""
    if use_cpu:
        return None
    import torch

    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "current_accelerator"):
        device = accelerator.current_accelerator()
        return None if device is None else device.type
    return "cuda" if torch.cuda.is_available() else None


def decide(enabled: bool, environ, use_cpu: bool, orig_argv: list[str] | None) -> tuple[bool, str]:
    """Whether to re-execute, and the fact the summary reports either way."""
    if not enabled:
        return False, "off (cpu_malloc_tunables false)"
    if environ.get(REEXEC_MARK_ENV):
        return False, f"applied: {TUNABLES_ENV}={environ.get(TUNABLES_ENV, '')} (set by the plugin at start)"
    if not on_glibc():
        return False, "not applied: glibc only (Linux); no effect here"
    if with_settings(environ.get(TUNABLES_ENV)) is None:
        return False, f"yours kept: {TUNABLES_ENV}={environ.get(TUNABLES_ENV)}"
    if not orig_argv or not sys.executable or _interactive() or _script_from_stdin(orig_argv):
        return False, (f"not applied: not a script started from a command line; set {TUNABLES_ENV}="
                       f"{with_settings(None)} before starting Python to get it")
    device = accelerator_in_use(use_cpu)
    if device is not None:
        return False, f"not applied: training on {device}, not CPU"
    return True, "re-executing with " + with_settings(environ.get(TUNABLES_ENV))


def reexecute_with_settings(environ=os.environ) -> None:
    """Replace this process with the same command under the settings (does not return unless exec fails)."""
    env = dict(environ)
    env[TUNABLES_ENV] = with_settings(environ.get(TUNABLES_ENV))
    env[REEXEC_MARK_ENV] = "1"
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, ValueError, OSError):
            pass
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError as err:  # the process keeps running without the settings, and says so
        logger.warning("Could not re-execute with %s (%s); continuing without it.", env[TUNABLES_ENV], err)


def apply_at_activation(enabled: bool, use_cpu: bool, environ=os.environ) -> None:
    """Called once when a strategy activates in a script: re-execute if `decide` says so, else record why not."""
    global outcome
    go, outcome = decide(enabled, environ, use_cpu, getattr(sys, "orig_argv", None))
    if go:
        reexecute_with_settings(environ)
        outcome = "not applied: re-executing failed (see the warning above)"


def summary_fact() -> str:
    """What the report records for this process (`host.malloc_tunables`)."""
    return outcome or (f"not applied: the strategy was not started from a script's command line (Python API); "
                       f"set {TUNABLES_ENV}={with_settings(None)} before Python starts to get it")


@hookimpl
def qlora_run_facts(explicit_options):
    fact = summary_fact()
    asked = explicit_options.get("cpu_malloc_tunables") is True
    return {"runtime": {"malloc_tunables": fact},
            "fallbacks": ["cpu_malloc_tunables " + fact] if asked and fact.startswith("not applied") else []}
