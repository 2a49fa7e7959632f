"""glibc's malloc tuned for CPU training: small-block caches off, 512 MiB kept at the heap top.

Why: glibc keeps small freed blocks (up to 1 KiB) in per-thread caches (tcache) and fastbins, and to their
neighbours such blocks still count as in use. Training on CPU frees large tensor blocks all the time; when a
cached small block sits between two of them they cannot merge, and the next dequantized weight or activation
that no longer fits in either half is taken from fresh memory at the top of the heap, which grows to several
times what is in use. With both caches off the blocks merge, but the merged memory then reaches the heap's top
and glibc hands it back to the kernel, only to fault it in again for the next layer (slower steps); keeping up
to 512 MiB at the top stops that. With all four settings below the 1.1B benchmark peaked at 2806-3067 MiB
against 4013-4641 MiB with glibc's defaults, steps as fast (docs/architecture.md, Decisions, and
docs/benchmarks.md have the measurements).

How: glibc reads `GLIBC_TUNABLES` only when a process starts, so the settings must be there before Python
starts. The plugin never restarts a script on its own: `qlora-plugin run -- COMMAND` (`launch`) starts the
command with them, and a CPU run without them gets a summary line saying so. `--cpu_malloc_tunables true` is
the opt-in alternative: the script re-executes itself once at `import trl`, before anything is loaded, so
everything it did before that import happens twice (same process id, arguments and open files). Never done in an
interactive session or notebook, for a script read from stdin, on an accelerator, off glibc, or when
`GLIBC_TUNABLES` already sets any of these (your settings win).
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
TRIM_THRESHOLD = 512 * 2**20  # free memory at the heap's top beyond this is returned to the system
MMAP_THRESHOLD = 32 * 2**20  # a block this large is mapped on its own when the heap has no free space for it
SETTINGS = (
    ("glibc.malloc.tcache_count", "0"),
    ("glibc.malloc.mxfast", "0"),
    ("glibc.malloc.trim_threshold", str(TRIM_THRESHOLD)),
    ("glibc.malloc.mmap_threshold", str(MMAP_THRESHOLD)),
)
REEXEC_MARK_ENV = "QLORA_PLUGIN_MALLOC_REEXEC"  # set in the re-executed process: never re-execute twice
LAUNCHER = "qlora-plugin run --"
OFF_GLIBC = "not applied: glibc only (Linux); no effect here"

outcome: str | None = None  # what `apply_at_activation` decided in this process (only when the user opted in)


def with_settings(current: str | None) -> str | None:
    """`current` GLIBC_TUNABLES with SETTINGS added; None when it already sets any of them (the user's win)."""
    entries = [e for e in (current or "").split(":") if e]
    names = {e.split("=", 1)[0] for e in entries}
    if any(name in names for name, _ in SETTINGS):
        return None
    return ":".join(entries + [f"{name}={value}" for name, value in SETTINGS])


def wanted(explicit_options: dict) -> bool:
    """The user's `cpu_malloc_tunables` (default off: opt-in), read before the strategy loads; a malformed value is
    reported by the strategy's option check just after."""
    value = explicit_options.get("cpu_malloc_tunables", False)
    if isinstance(value, str):
        return value.strip().lower() in ("true", "t", "yes", "y", "1")
    return value is True


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


def at_start(environ) -> str | None:
    """What the process started with: the settings (`applied: ...`), the user's own malloc settings (`yours kept:
    ...`), or None (glibc's defaults)."""
    current = environ.get(TUNABLES_ENV)
    if with_settings(current) is not None:
        return None
    if all(f"{name}={value}" in current.split(":") for name, value in SETTINGS):
        how = "the plugin's restart, cpu_malloc_tunables" if environ.get(REEXEC_MARK_ENV) else "set at start"
        return f"applied: {TUNABLES_ENV}={current} ({how})"
    return f"yours kept: {TUNABLES_ENV}={current}"


def how_to_apply() -> str:
    return f"start the command with `{LAUNCHER} COMMAND` or with {TUNABLES_ENV}={with_settings(None)}"


def decide(enabled: bool, environ, use_cpu: bool, orig_argv: list[str] | None) -> tuple[bool, str]:
    """Whether the opted-in restart happens, and the fact the summary reports either way."""
    if not on_glibc():
        return False, OFF_GLIBC
    started_with = at_start(environ)
    if started_with is not None:
        return False, started_with
    if not orig_argv or not sys.executable or _interactive() or _script_from_stdin(orig_argv):
        return False, f"not applied: not a script started from a command line; {how_to_apply()}"
    device = accelerator_in_use(use_cpu)
    if device is not None:
        return False, f"not applied: training on {device}, not CPU"
    return True, "re-executing with " + with_settings(environ.get(TUNABLES_ENV))


def _flush() -> None:
    """Before an exec: what was printed so far must not be lost with this process image."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, ValueError, OSError):
            pass


def reexecute_with_settings(environ=os.environ) -> None:
    """Replace this process with the same command under the settings (does not return unless exec fails)."""
    env = dict(environ)
    env[TUNABLES_ENV] = with_settings(environ.get(TUNABLES_ENV))
    env[REEXEC_MARK_ENV] = "1"
    _flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError as err:  # the process keeps running without the settings, and says so
        logger.warning("Could not re-execute with %s (%s); continuing without it.", env[TUNABLES_ENV], err)


def apply_at_activation(enabled: bool, use_cpu: bool, environ=os.environ) -> None:
    """Called once when a strategy activates in a script. Only with `--cpu_malloc_tunables true` (opt-in) does it
    re-execute, if `decide` says so; otherwise the process is left alone."""
    global outcome
    if not enabled:
        return
    go, outcome = decide(enabled, environ, use_cpu, getattr(sys, "orig_argv", None))
    if go:
        reexecute_with_settings(environ)
        outcome = "not applied: re-executing failed (see the warning above)"


def summary_fact(device: str = "cpu", environ=os.environ) -> str:
    """What the report records for this process (`runtime.malloc_tunables`)."""
    if outcome is not None:
        return outcome
    if device != "cpu":
        return f"not applied: training on {device}, not CPU"
    if not on_glibc():
        return OFF_GLIBC
    return at_start(environ) or f"not applied: glibc's defaults; {how_to_apply()}"


def launch(command: list[str], environ=os.environ) -> None:
    """`qlora-plugin run -- COMMAND`: replace this process with COMMAND (same process id), started with the settings;
    the user's own GLIBC_TUNABLES malloc settings are kept. Raises OSError when the command cannot be started."""
    env = dict(environ)
    if not on_glibc():
        print(f"qlora-plugin run: not a glibc system, {TUNABLES_ENV} has no effect here; running the command as is.",
              file=sys.stderr)
    elif (at_start(environ) or "").startswith("yours kept"):
        print(f"qlora-plugin run: your {TUNABLES_ENV}={environ.get(TUNABLES_ENV)} sets malloc already; kept as is.",
              file=sys.stderr)
    elif at_start(environ) is None:
        env[TUNABLES_ENV] = with_settings(environ.get(TUNABLES_ENV))
    _flush()
    os.execvpe(command[0], command, env)


@hookimpl
def qlora_summary_lines(facts):
    malloc = facts.get("runtime", {}).get("malloc_tunables", "")
    if malloc.startswith("applied"):
        return [("host malloc", "glibc small-block caches off, 512 MiB kept at the heap top (GLIBC_TUNABLES at start)")]
    if malloc.startswith("not applied: glibc's defaults"):
        return [("host malloc", "glibc's defaults; about a third lower peak memory on CPU when started with "
                                "`qlora-plugin run -- <this command>` (docs/troubleshooting.md, problem 11)")]
    return None


@hookimpl
def qlora_run_facts(explicit_options, runtime):
    fact = summary_fact(runtime.device_type)
    asked = explicit_options.get("cpu_malloc_tunables") is True
    return {"runtime": {"malloc_tunables": fact},
            "fallbacks": ["cpu_malloc_tunables " + fact] if asked and fact.startswith("not applied") else []}
