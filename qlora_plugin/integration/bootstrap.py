"""Process start-up hook (run from the installed `qlora_plugin_activate.pth`). Standard library only.

It only installs an import watcher: nothing happens until the process imports `trl`. Then `activation` reads
`--strategy` (CLI, YAML `--config`, or `QLORA_PLUGIN_STRATEGY`); without one, TRL is left exactly as it is.
`QLORA_PLUGIN_DISABLE=1` turns all of this off.
"""

import os
import sys

from qlora_plugin.integration.import_hook import DISABLE_ENV, watcher



def disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _on_trl_import(module):
    from qlora_plugin.integration import activation  # only now: every Python process runs this module's import

    activation.activate_from_process()


def install():
    """Entry point of the .pth file. Idempotent."""
    if disabled():
        return
    w = watcher()
    if "trl" not in w.callbacks and "trl" not in sys.modules:
        w.watch("trl", _on_trl_import)
