"""Which checkpoint `--resume_from_checkpoint` means: a folder, or `true`/`latest` for the newest complete one."""

from __future__ import annotations

import logging
import os

from qlora_plugin.core.errors import QLoRAPluginError

logger = logging.getLogger(__name__)

LATEST = ("true", "latest", "last")
NOT_RESUMING = ("", "false", "none", "no")
# What a checkpoint of a LoRA run needs to resume completely (optimizer and scheduler only when saved).
REQUIRED_FILES = ("trainer_state.json",)


def resolve_checkpoint(value, output_dir: str) -> str | None:
    """The checkpoint folder `--resume_from_checkpoint VALUE` names, or None for no resume.

    `True`/"true"/"latest"/"last": the newest `checkpoint-N` in `output_dir`. A path must be a checkpoint folder.
    """
    if value is None or value is False or (isinstance(value, str) and value.strip().lower() in NOT_RESUMING):
        return None
    if value is True or (isinstance(value, str) and value.strip().lower() in LATEST):
        newest = newest_checkpoint(output_dir)
        if newest is None:
            raise QLoRAPluginError(
                f"--resume_from_checkpoint {value}: there is no checkpoint-N folder in {output_dir!r} to resume "
                "from. Pass the output_dir of the run you want to continue, or drop --resume_from_checkpoint to "
                "start a new run."
            )
        return newest
    path = str(value)
    if not os.path.isdir(path):
        raise QLoRAPluginError(
            f"--resume_from_checkpoint {path!r} is not a folder. Pass a checkpoint folder such as "
            f"{os.path.join(output_dir, 'checkpoint-500')}, or `true` for the newest checkpoint in output_dir"
            f"{_available(output_dir)}."
        )
    if not _complete(path):
        raise QLoRAPluginError(
            f"--resume_from_checkpoint {path!r} is not a complete training checkpoint (no "
            f"{', '.join(REQUIRED_FILES)}). "
            f"Pass a checkpoint-N folder the Trainer saved{_available(output_dir)}."
        )
    return path


def _complete(folder: str) -> bool:
    return all(os.path.isfile(os.path.join(folder, name)) for name in REQUIRED_FILES)


def newest_checkpoint(output_dir: str) -> str | None:
    """The highest-numbered complete `checkpoint-N` in `output_dir` (an incomplete one, from a run killed without
    this plugin's atomic saves, is skipped with a warning), or None."""
    from transformers.trainer_utils import sort_checkpoints

    found = sort_checkpoints(output_dir) if os.path.isdir(output_dir) else []
    for folder in reversed(found):
        if _complete(folder):
            return folder
        logger.warning("[qlora-plugin] skipping %s: incomplete (no %s)", folder, ", ".join(REQUIRED_FILES))
    return None


def _available(output_dir: str) -> str:
    from transformers.trainer_utils import sort_checkpoints

    found = sort_checkpoints(output_dir) if os.path.isdir(output_dir) else []
    return f" (found: {', '.join(found)})" if found else f" (none found in {output_dir!r})"
