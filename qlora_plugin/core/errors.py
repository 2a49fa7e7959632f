"""The one exception type for user errors, and how a script shows it: a message, not a traceback."""

from __future__ import annotations

import sys


class QLoRAPluginError(ValueError):
    """Bad input from the user (flag, YAML key, option value, hook file, model folder).

    The message says what was wrong, what is allowed and how to fix it. Scripts print it without a traceback
    and exit non-zero (see `integration.excepthook`); Python API callers can catch it like any `ValueError`.
    """


EXIT_USER_ERROR = 2


def report_and_exit(err: BaseException) -> None:
    """Print a user error the way a command-line tool should, then exit non-zero."""
    print(f"qlora-plugin: error: {err}", file=sys.stderr)
    raise SystemExit(EXIT_USER_ERROR)


