"""How a script shows a user error while a strategy is active: one message, not a traceback, and exit status 2.

Python ends every uncaught exception with status 1, whatever the excepthook does; bad input ends with 2 everywhere
else (argparse, the activation at `import trl`, the `qlora-plugin` commands), so the hook ends the process itself
after running the exit handlers (`atexit`: logging's flush, accelerate's clean-up) as a normal exit would.
"""

from __future__ import annotations

import atexit
import os
import sys

from qlora_plugin.core.errors import QLoRAPluginError
from qlora_plugin.integration.known_errors import message


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
            return exit_now(USER_ERROR)
        known = message(exc, tb)
        if known is not None:  # bad input a library reported: its words, without the traceback
            print(f"qlora-plugin: error: {known}", file=sys.stderr)
            return exit_now(USER_ERROR)
        if exc_type.__name__ == "CalledProcessError" and getattr(exc, "cmd", None):
            # `trl sft` / `accelerate launch` re-raise the training child's exit; the child already said why, and
            # its status (2 for bad input) is the command's.
            print(f"qlora-plugin: the training process exited with status {exc.returncode}.", file=sys.stderr)
            code = exc.returncode
            return exit_now(code if isinstance(code, int) and 0 < code < 256 else 1)
        previous(exc_type, exc, tb)

    hook._qlora_plugin = True
    sys.excepthook = hook


USER_ERROR = 2


def exit_now(code: int) -> None:
    """End the process with `code` as a normal exit would: the exit handlers run, the streams are flushed."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    os._exit(code)
