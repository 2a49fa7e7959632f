"""The packaged `qdora` hook as a hook file, for `--qlora_hooks hooks/qdora.py` from a clone of this repository.

Installed users name it instead: `--qlora_hooks qdora`. The code is `qlora_plugin/hooks/qdora.py`.
"""

from qlora_plugin.hooks.qdora import *  # noqa: F401,F403 (its @hookimpl functions are this file's hooks)
