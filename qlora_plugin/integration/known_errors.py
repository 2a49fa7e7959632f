"""Bad input that libraries report with a traceback in the user's script, said as one message instead.

Used by the excepthook `excepthook.install_excepthook` sets while a strategy is active: an unknown flag (transformers'
`HfArgumentParser`), a dataset that cannot be loaded (`datasets`), bf16 asked for on a machine without it
(a missing resume checkpoint is caught earlier, by `checkpointing.resolve_checkpoint`).
Anything not recognised here keeps Python's traceback:
it may be a bug, and then the traceback is what helps.
"""

from __future__ import annotations

import difflib

from qlora_plugin.errors import QLoRAPluginError
from qlora_plugin.options import OWN_KEYS

UNUSED_ARGS = "Some specified arguments are not used by the HfArgumentParser: "


def suggestion(name: str) -> str:
    """' Did you mean --lora_r?' for a name close to one of the plugin's flags, else ''."""
    close = difflib.get_close_matches(name.lstrip("-").replace("-", "_"), sorted(OWN_KEYS), n=1, cutoff=0.75)
    return f" Did you mean --{close[0]}?" if close else ""


def check_unused_yaml_keys(flags) -> None:
    """YAML keys no parser took (`--key` strings) that look like a misspelled plugin key: TRL would drop them."""
    misspelled = [f"{flag[2:]}:{suggestion(flag)}" for flag in flags if suggestion(flag)]
    if misspelled:
        raise QLoRAPluginError(
            f"Unknown key(s) in the YAML config, which TRL would silently ignore: {' '.join(misspelled)} "
            "`qlora-plugin strategies` lists the strategy options."
        )


def _innermost_module(tb) -> str:
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_globals.get("__name__", "") if tb is not None else ""


def _caller_outside(tb, package: str) -> str:
    """`file:line` of the last frame before the traceback enters `package` (where the user's script called it)."""
    where = ""
    while tb is not None:
        if tb.tb_frame.f_globals.get("__name__", "").split(".")[0] == package:
            break
        where = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}"
        tb = tb.tb_next
    return where


def message(exc: BaseException, tb) -> str | None:
    """The message for an exception that is bad input the library already described, or None."""
    text = str(exc)
    if isinstance(exc, ValueError) and text.startswith(UNUSED_ARGS):
        import ast

        try:
            unused = [str(a) for a in ast.literal_eval(text[len(UNUSED_ARGS):])]
        except (ValueError, SyntaxError):
            unused = [text[len(UNUSED_ARGS):]]
        flags = [a for a in unused if a.startswith("--")]
        hints = "".join(suggestion(f.split("=")[0]) for f in flags)
        return (f"Unknown argument(s) {' '.join(unused)}: the script does not take them.{hints} `--help` lists "
                "the script's flags; `qlora-plugin strategies` lists the strategy options.")
    module = _innermost_module(tb)
    if isinstance(exc, OSError) and module.split(".")[0] == "datasets":
        where = _caller_outside(tb, "datasets")
        return (f"The dataset could not be loaded: {text} (in load_dataset, called at {where}). Pass a local "
                "folder or file of .jsonl/.json/.csv/.parquet data, or a Hub dataset id on a machine that reaches "
                "the Hub.")
    if isinstance(exc, ValueError) and "doesn't support bf16/gpu" in text:
        return (f"{text.rstrip('.')}: this machine has no GPU with bf16, and TRL's SFTConfig asks for bf16 by "
                "default. Add `--use_cpu` to train on the CPU (the strategy then uses bf16 only if the CPU runs it "
                "natively, else float32).")
    return None
