"""Resume and checkpoint safety for a trainer a strategy was applied to.

`enable_resume` is called from `training.pipeline.prepare_trainer_kwargs` (every path: scripts, YAML, Python API),
before the model loads; `install` then wraps three methods of the one trainer the strategy was applied to, as
attributes of that instance over its class's own (`Trainer.train`, `_save_checkpoint`, `save_model`, with TRL's
overrides inside), so every other trainer in the process is TRL's, untouched. Where the plugin never sees the trainer
it built (`SFTTrainer(**apply_strategy(...))` written by the user), `patch_trainer_class` is the fallback: the same
wrappers on `transformers.Trainer`, passing straight through for a trainer without a strategy.

- `train`: `args.resume_from_checkpoint` is used when `train()` gets none (TRL's scripts and many user scripts
  drop it); `true`/`latest` means the newest complete `checkpoint-N` in `output_dir`; a missing or incomplete
  checkpoint is a `QLoRAPluginError`, and so is one this run cannot continue (`checkpoint_checks`: another
  strategy or rank, damaged files, no optimizer state). SIGTERM/SIGINT stop training cleanly after a checkpoint
  (`interruption`), during an evaluation too.
- `_save_checkpoint`: the checkpoint is written into `output_dir/.tmp-checkpoint-N/` and renamed to
  `checkpoint-N` only once complete, so a killed process never leaves a half-written `checkpoint-N` that
  `--resume_from_checkpoint true` would pick (transformers 5.24 writes straight into `checkpoint-N`).
- `save_model`: the final adapter is written into `.tmp-model/` and each file renamed into place, so
  `adapter_model.safetensors` is either the previous file or the new one, never half of one; under FSDP it is
  gathered whatever the configured state dict type (`fsdp_save`).

Both end with the permissions a plain write would give (`files.give_normal_permissions`): safetensors writes
`adapter_model.safetensors` 0600 whatever the umask.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import types

from qlora_plugin.ecosystem.compat import SAVE_CHECKPOINT_METHOD, redirect_output_dir, restore_output_dir, trainer_output_dir
from qlora_plugin.core.files import give_normal_permissions
from qlora_plugin.training.checkpoint_checks import ResumeGuard, check_before_load
from qlora_plugin.training.checkpoints import resolve_checkpoint
from qlora_plugin.training.fsdp_save import save_fsdp_adapter
from qlora_plugin.training.interruption import graceful_stop
from qlora_plugin.training.report import StrategyReportCallback

logger = logging.getLogger(__name__)

STAGING_PREFIX = ".tmp-"
STAGING_MODEL = STAGING_PREFIX + "model"


def enable_resume(args, options, own_quantization: bool = True, own_adapter: bool = True,
                  loading: bool = True) -> ResumeGuard:
    """Check `args.resume_from_checkpoint` before the model is loaded (the folder, its files, and what the strategy
    options decide: `own_*` when the strategy, not the user's config, quantizes / builds the adapter; `loading`
    when the model is still to be loaded). Returns the callback that carries the run's resume settings to `train()`;
    the wrappers are installed on the trainer once it exists (`install`)."""
    checkpoint = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)
    if loading:
        check_before_load(checkpoint, options, own_quantization, own_adapter)
    return ResumeGuard(accept_missing_optimizer=options.resume_without_optimizer)


def _applies(trainer) -> bool:
    handler = getattr(trainer, "callback_handler", None)
    return handler is not None and any(isinstance(cb, StrategyReportCallback) for cb in handler.callbacks)


def _wrappers():
    return (("train", _make_train), (SAVE_CHECKPOINT_METHOD, _make_save_checkpoint), ("save_model", _make_save_model))


def _wrapped(original, make):
    wrapper = functools.wraps(original)(make(original))
    wrapper._qlora_plugin = True
    return wrapper


def install(trainer) -> None:
    """Wrap `train`, `_save_checkpoint` and `save_model` of this trainer only: bound methods set on the instance over
    its class's (TRL's overrides included), once. Called right after the trainer's own `__init__`. Not when this
    process already has the class fallback (`patch_trainer_class`): its wrappers act for this trainer, and a second
    layer would stage every save twice."""
    from transformers import Trainer

    if getattr(vars(Trainer)["train"], "_qlora_plugin", False):
        return
    for name, make in _wrappers():
        if name not in vars(trainer):
            setattr(trainer, name, types.MethodType(_wrapped(getattr(type(trainer), name), make), trainer))


def patch_trainer_class() -> None:
    """The fallback for a trainer the plugin never sees (`SFTTrainer(**apply_strategy(...))`): the same wrappers on
    `transformers.Trainer` (once; each passes straight through for a trainer without a strategy)."""
    from transformers import Trainer

    for name, make in _wrappers():
        original = getattr(Trainer, name)
        if not getattr(original, "_qlora_plugin", False):
            setattr(Trainer, name, _wrapped(original, make))


def _make_train(original):
    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if not _applies(self):
            return original(self, resume_from_checkpoint, *args, **kwargs)
        if resume_from_checkpoint is None:
            resume_from_checkpoint = self.args.resume_from_checkpoint
        checkpoint = resolve_checkpoint(resume_from_checkpoint, self.args.output_dir)
        guard = next((cb for cb in self.callback_handler.callbacks if isinstance(cb, ResumeGuard)), ResumeGuard())
        guard.check(checkpoint, self)  # before transformers loads anything from it
        if self.args.should_save:
            remove_stale_staging(self.args.output_dir)
            if checkpoint:
                print(f"[qlora-plugin] resuming from {checkpoint}", flush=True)
        with graceful_stop(self):
            return original(self, checkpoint, *args, **kwargs)

    return train


def _make_save_checkpoint(original):
    def _save_checkpoint(self, model, trial):
        if not _applies(self):
            return original(self, model, trial)
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

        run_dir = trainer_output_dir(self, trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging_root = os.path.join(run_dir, STAGING_PREFIX + name)
        staged, final = os.path.join(staging_root, name), os.path.join(run_dir, name)
        main = self.args.should_save
        if main:
            shutil.rmtree(staging_root, ignore_errors=True)  # left by a process killed mid-save
        self.accelerator.wait_for_everyone()
        redirect_output_dir(self, staging_root)  # transformers saves into <run_dir>/checkpoint-N
        try:
            original(self, model, trial)
            self.accelerator.wait_for_everyone()
            if main:
                if self.state.best_model_checkpoint == staged:
                    self.state.best_model_checkpoint = final
                    self.state.save_to_json(os.path.join(staged, "trainer_state.json"))
                give_normal_permissions(staged)  # safetensors writes the adapter 0600
                replace_folder(staged, final)
                rotate_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint,
                                   use_mtime=True)
        finally:
            restore_output_dir(self)
            if main:
                shutil.rmtree(staging_root, ignore_errors=True)

    return _save_checkpoint


def _make_save_model(original):
    def save_model(self, output_dir=None, _internal_call=False):
        output_dir = output_dir or self.args.output_dir
        if not _applies(self) or _in_staging(output_dir):
            return original(self, output_dir, _internal_call)
        staging = os.path.join(output_dir, STAGING_MODEL)
        main = self.args.should_save
        if main:
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        try:
            if self.is_fsdp_enabled:
                save_fsdp_adapter(self, staging)  # transformers writes nothing under a sharded state dict
            else:
                original(self, staging, True)
            self.accelerator.wait_for_everyone()
            if main:
                give_normal_permissions(staging)  # safetensors writes the adapter 0600
                move_files(staging, output_dir)
        finally:
            if main:
                shutil.rmtree(staging, ignore_errors=True)
        if self.args.push_to_hub and not _internal_call:  # what transformers does after a user's save_model
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    return save_model


def _in_staging(path: str) -> bool:
    """True for `save_model` called by `_save_checkpoint` into a staging folder (already atomic)."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
    return parent.startswith(f"{STAGING_PREFIX}{PREFIX_CHECKPOINT_DIR}-")


def replace_folder(src: str, dst: str) -> None:
    """Rename the complete folder `src` to `dst`, replacing an existing `dst` (a re-save of the same step)."""
    if os.path.exists(dst):
        old = os.path.join(os.path.dirname(dst), STAGING_PREFIX + "old-" + os.path.basename(dst))
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def move_files(src: str, dst: str) -> None:
    """Rename every file under `src` to the same place under `dst`; weights last, so configs never lag them."""
    files = [os.path.relpath(os.path.join(root, f), src) for root, _, names in os.walk(src) for f in names]
    weights = (".safetensors", ".bin", ".pt", ".pth")
    for rel in sorted(files, key=lambda f: (f.endswith(weights), f)):
        target = os.path.join(dst, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(os.path.join(src, rel), target)


def remove_stale_staging(output_dir: str) -> None:
    """Remove staging folders a killed process left behind (never complete, never resumed from)."""
    if not os.path.isdir(output_dir):
        return
    for entry in os.listdir(output_dir):
        path = os.path.join(output_dir, entry)
        ours = entry.startswith((STAGING_PREFIX + "checkpoint-", STAGING_PREFIX + "old-")) or entry == STAGING_MODEL
        if ours and os.path.isdir(path):
            logger.warning("[qlora-plugin] removing %s, an incomplete save from an interrupted run", path)
            shutil.rmtree(path, ignore_errors=True)
