"""A clean run prints the summary, progress and the result, nothing a user has to wonder about (issue 16, item 7):
gradient checkpointing set through the fields the Trainer reads (no deprecated names of ours), and the library
messages in `qlora_plugin/ecosystem/notices.py` left out, each matched exactly and nothing else."""

from __future__ import annotations

import logging
import warnings

import pytest
from datasets import load_dataset

from conftest import DATA, TRAIN_FLAGS, run_command
from qlora_plugin.ecosystem.runtime import Runtime

NOISE = ("FutureWarning", "DeprecationWarning", "kernels-community", "were not passed to `accelerate launch`",
         "Traceback", "Retrying in")


@pytest.mark.slow
def test_a_trl_cli_run_prints_no_noise(tiny_models, dataset_dir, tmp_path):
    proc = run_command(["trl", "sft", "--model_name_or_path", tiny_models["llama"], "--dataset_name", dataset_dir,
                        "--output_dir", str(tmp_path / "out"), "--strategy", "qlora", *TRAIN_FLAGS], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert [word for word in NOISE if word in output] == [], output[-4000:]
    assert "[qlora-plugin] strategy qlora" in output and "Training completed" in output
    assert "activation_checkpointing=True, activation_checkpointing_kwargs={'use_reentrant': False}" in output


@pytest.mark.slow
def test_plan_prints_no_noise(tiny_models, tmp_path):
    proc = run_command(["qlora-plugin", "plan", tiny_models["llama"]], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [word for word in NOISE if word in proc.stdout + proc.stderr] == [], proc.stderr[-3000:]


def sft_config(tmp_path, **values):
    from trl import SFTConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # a user's own deprecated names: theirs to see, not here
        return SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to="none",
                         use_cpu=True, max_length=32, save_strategy="no", **values)


@pytest.mark.slow
def test_the_recipe_sets_what_the_trainer_reads_and_the_trainer_uses_it(tiny_models, tmp_path):
    """Under DeepSpeed ZeRO-3 the recipe asks for reentrant checkpointing; set after `__post_init__` under the old
    name it never reached the Trainer, whose model then checkpointed non-reentrantly."""
    from trl import SFTTrainer

    from qlora_plugin.strategies.recipe import apply_training_defaults, training_defaults

    args = sft_config(tmp_path)
    applied = apply_training_defaults(args, training_defaults(10**6, Runtime("cpu", False, "deepspeed_zero3")), set())
    assert applied["activation_checkpointing_kwargs"] == {"use_reentrant": True}
    assert args.gradient_checkpointing_kwargs is args.activation_checkpointing_kwargs  # mirrored, as transformers
    trainer = SFTTrainer(model=tiny_models["llama"], args=args, train_dataset=load_dataset(str(DATA))["train"])
    trainer.train()
    used = {m._gradient_checkpointing_func.keywords.get("use_reentrant")
            for m in trainer.model.modules() if getattr(m, "gradient_checkpointing", False)}
    assert used == {True}


@pytest.mark.parametrize("explicit, values, kept", [
    ({"gradient_checkpointing_kwargs"}, {}, "activation_checkpointing_kwargs"),  # the old flag on a command line
    ({"activation_checkpointing"}, {}, "activation_checkpointing"),  # the new flag
    (set(), {"gradient_checkpointing": False}, "activation_checkpointing"),  # Python, old name
    (set(), {"activation_checkpointing_kwargs": {"use_reentrant": True}}, "activation_checkpointing_kwargs"),
])
def test_the_users_checkpointing_wins_under_either_name(tmp_path, explicit, values, kept):
    from qlora_plugin.strategies.recipe import apply_training_defaults, training_defaults, user_set

    args = sft_config(tmp_path, **values)
    before = getattr(args, kept)
    applied = apply_training_defaults(args, training_defaults(10**6, Runtime("cpu", False, "none")), explicit)
    assert kept not in applied and getattr(args, kept) == before and user_set(args, kept, explicit)


def test_a_plugins_defaults_under_the_deprecated_names_reach_the_trainers_fields(tmp_path):
    from qlora_plugin.strategies.recipe import apply_training_defaults

    args = sft_config(tmp_path)
    applied = apply_training_defaults(args, {"gradient_checkpointing": False,
                                             "gradient_checkpointing_kwargs": {"use_reentrant": True}}, set())
    assert applied == {"activation_checkpointing": False, "activation_checkpointing_kwargs": {"use_reentrant": True}}
    assert args.activation_checkpointing is False and args.gradient_checkpointing is False


def test_defaults_left_alone_are_the_recipes(tmp_path):
    from qlora_plugin.strategies.recipe import apply_training_defaults, training_defaults

    args = sft_config(tmp_path)  # TRL's default: gradient checkpointing on, no kwargs
    applied = apply_training_defaults(args, training_defaults(10**6, Runtime("cpu", False, "none")), set())
    assert applied["activation_checkpointing"] is True
    assert args.activation_checkpointing_kwargs == {"use_reentrant": False} == args.gradient_checkpointing_kwargs


@pytest.mark.parametrize("explicit, values, expected", [
    (set(), {}, 64),  # left alone (TRL's "auto", None off Neuron): the recipe pads on CPU
    ({"pad_to_multiple_of"}, {"pad_to_multiple_of": None}, None),  # `--pad_to_multiple_of none` on a command line
    (set(), {"pad_to_multiple_of": 8}, 8),  # Python
])
def test_on_cpu_rows_are_padded_to_a_multiple_of_64_unless_you_chose(tmp_path, explicit, values, expected):
    """Every new batch shape leaves memory behind on CPU (oneDNN's per-shape kernels, heap fragments: docs/plan.md,
    "Rows of different lengths on CPU"), so the recipe pads rows to a multiple of 64 there, and on no GPU."""
    from qlora_plugin.plan.estimate import trained_length
    from qlora_plugin.strategies.recipe import apply_training_defaults, training_defaults

    args = sft_config(tmp_path, **values)
    apply_training_defaults(args, training_defaults(10**6, Runtime("cpu", False, "none")), explicit)
    assert args.pad_to_multiple_of == expected
    assert trained_length(args) == (64 if expected == 64 else 32)  # max_length 32, padded up to the multiple
    assert "pad_to_multiple_of" not in training_defaults(10**6, Runtime("cuda", True, "none"))


def emitted(logger_name, *messages) -> list[str]:
    """What reaches a handler of `logger_name` when it logs `messages` as warnings."""
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    logger = logging.getLogger(logger_name)
    handler = Keep()
    logger.addHandler(handler)
    try:
        for message in messages:
            logger.warning(message)
    finally:
        logger.removeHandler(handler)
    return seen


def test_only_the_exact_library_messages_are_left_out():
    from qlora_plugin.ecosystem import notices

    notices.leave_out_for_a_strategy_run(user_named_gradient_checkpointing=True)
    kernel = ("Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'. Please make "
              "sure you already `pip install kernels` and the kernels >= 0.11.1")
    assert emitted("bitsandbytes.backends.cpu.ops", kernel, "something else") == ["something else"]
    defaults = ("The following values were not passed to `accelerate launch` and had defaults used instead:\n"
                "\t`--num_processes` was set to a value of `{}`\n\t`--num_machines` was set to a value of `1`\n"
                "To avoid this warning pass in values for each of the problematic parameters or run `accelerate "
                "config`.")
    gpus = defaults.format(4).replace("\nTo", "\n\t\tMore than one GPU was found, enabling multi-GPU training.\nTo")
    assert emitted("accelerate.commands.launch", defaults.format(0), defaults.format(1), gpus,
                   defaults.format(2)) == [gpus, defaults.format(2)]
    failed = "'[Errno -2] Name or service not known' thrown while requesting HEAD https://huggingface.co/x/y/a.md"
    shown = emitted("huggingface_hub.utils._http", failed, "Retrying in 1s [Retry 1/5].", failed,
                    "Retrying in 2s [Retry 2/5].", "HTTP Error 503 thrown while requesting GET https://h.co/z",
                    "Retrying in 1s [Retry 1/5].")
    assert shown == ["[qlora-plugin] https://huggingface.co cannot be reached ([Errno -2] Name or service not "
                     "known); huggingface_hub retries for about 20 s before it gives up. HF_HUB_OFFLINE=1 uses "
                     "local files only and fails at once.",
                     "HTTP Error 503 thrown while requesting GET https://h.co/z", "Retrying in 1s [Retry 1/5]."]


@pytest.mark.parametrize("user_named_it", [False, True])
def test_trls_checkpointing_default_is_quiet_unless_the_user_named_it(tmp_path, user_named_it):
    from trl import SFTConfig

    from qlora_plugin.ecosystem import notices

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        notices.leave_out_for_a_strategy_run(user_named_gradient_checkpointing=user_named_it)
        SFTConfig(output_dir=str(tmp_path), use_cpu=True)
    deprecated = [str(w.message) for w in caught if "`gradient_checkpointing` is deprecated" in str(w.message)]
    assert bool(deprecated) is user_named_it
