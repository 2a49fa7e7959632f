"""How a script shows a user error while a strategy is active: one message, not a traceback."""

from __future__ import annotations

import sys

from qlora_plugin.errors import QLoRAPluginError
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
            return
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
