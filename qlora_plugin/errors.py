"""The one exception type for user errors, and how a script shows it: a message, not a traceback."""

from __future__ import annotations

import sys


class QLoRAPluginError(ValueError):
    """Bad input from the user (flag, YAML key, option value, hook file, model folder).

    The message says what was wrong, what is allowed and how to fix it. Scripts print it without a traceback
    and exit non-zero (see `install_excepthook`); Python API callers can catch it like any `ValueError`.
    """


EXIT_USER_ERROR = 2


def report_and_exit(err: BaseException) -> None:
    """Print a user error the way a command-line tool should, then exit non-zero."""
    print(f"qlora-plugin: error: {err}", file=sys.stderr)
    raise SystemExit(EXIT_USER_ERROR)


def install_excepthook() -> None:
    """Show `QLoRAPluginError`, bad input a library reported (`known_errors`) and a training child's failure as a
    message in scripts, not a traceback.

    Called when a strategy is activated in a script process; every other exception keeps Python's hook.
    """
    if getattr(sys.excepthook, "_qlora_plugin", False):
        return
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        if issubclass(exc_type, QLoRAPluginError):
            print(f"qlora-plugin: error: {exc}", file=sys.stderr)
            return
        from .known_errors import message

        known = message(exc, tb)
        if known is not None:  # bad input a library reported: its words, without the traceback
            print(f"qlora-plugin: error: {known}", file=sys.stderr)
            return
        if exc_type.__name__ == "CalledProcessError" and getattr(exc, "cmd", None):
            # `trl sft` / `accelerate launch` re-raise the training child's exit; the child already said why.
            print(f"qlora-plugin: the training process exited with status {exc.returncode}.", file=sys.stderr)
            return
        previous(exc_type, exc, tb)

    hook._qlora_plugin = True
    sys.excepthook = hook
