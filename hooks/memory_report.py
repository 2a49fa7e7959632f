"""The packaged `memory_report` hook as a hook file, for `--qlora_hooks hooks/memory_report.py` from a clone of this repository.

Installed users name it instead: `--qlora_hooks memory_report`. The code is `qlora_plugin/hooks/memory_report.py`.
"""

from qlora_plugin.hooks.memory_report import *  # noqa: F401,F403 (its @hookimpl functions are this file's hooks)
