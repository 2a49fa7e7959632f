"""Bad input that libraries report with a traceback in the user's script, said as one message instead.

Used by the excepthook `excepthook.install_excepthook` sets while a strategy is active: an unknown flag (transformers'
`HfArgumentParser`), a dataset that cannot be loaded (`datasets`: a missing folder, a name that is neither a path
nor a Hub id, the Hub out of reach), bf16 asked for on a machine without it
(a missing resume checkpoint is caught earlier, by `checkpointing.resolve_checkpoint`).
Anything not recognised here keeps Python's traceback:
it may be a bug, and then the traceback is what helps.
"""

from __future__ import annotations

import difflib
import os
import re

from qlora_plugin.core.errors import QLoRAPluginError
from qlora_plugin.core.options import OWN_KEYS
from qlora_plugin.training.model_checks import looks_like_path

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


def _through(tb, package: str) -> bool:
    """The traceback passes through `package` (e.g. a huggingface_hub error raised for `datasets`)."""
    while tb is not None:
        if tb.tb_frame.f_globals.get("__name__", "").split(".")[0] == package:
            return True
        tb = tb.tb_next
    return False


DATASET_HINT = ("Pass a local folder of .jsonl/.json/.csv/.parquet files, or a Hub dataset id on a machine that "
                "reaches the Hub.")
DATA_FILE_TYPES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def _single_file_message(path: str, where: str) -> str:
    """`--dataset_name` names one data file: `load_dataset(NAME)` reads a folder or a Hub id, never one file."""
    kind = DATA_FILE_TYPES.get(os.path.splitext(path)[1].lower())
    folder = os.path.dirname(path) or "."
    others = [f for f in os.listdir(folder) if f != os.path.basename(path)
              and os.path.splitext(f)[1].lower() in DATA_FILE_TYPES]
    fix = (f"Pass its folder instead: --dataset_name {folder}" if not others else
           f"Move it into a folder of its own and pass that folder: {folder} has other data files, which would be "
           f"read too")
    direct = f'; in Python, load_dataset("{kind}", data_files={path!r}) reads the file itself' if kind else ""
    return (f"The dataset could not be loaded: {path!r} is a file, and `load_dataset` (called at {where}) reads a "
            f"folder of data files or a Hub dataset id, not a single file. {fix} (files named train*/test* are the "
            f"training/evaluation splits, any other is the training split){direct}.")


def _dataset_message(exc: BaseException, tb) -> str | None:
    """A dataset `load_dataset` could not load: a missing path, a name that is no Hub id, the Hub out of reach."""
    text = " ".join(str(exc).split())
    where = _caller_outside(tb, "datasets")
    missing = "The dataset could not be loaded: {!r} is not a folder or file (looked in " + os.getcwd() + ")"
    if type(exc).__name__ == "HFValidationError":  # not an existing path, and not a valid Hub id either
        name = re.search(r"'([^']*)'\.?$", text)
        return (missing.format(name.group(1) if name else text) + ", nor a Hub dataset id (in load_dataset, called "
                f"at {where}). {DATASET_HINT}")
    unreachable = re.match(r"Couldn't reach '([^']*)' on the Hub", text)
    if unreachable and looks_like_path(unreachable.group(1)):  # offline, `datasets` tried a missing path as an id
        return missing.format(unreachable.group(1)) + f" (in load_dataset, called at {where}). {DATASET_HINT}"
    named = re.match(r"Couldn't find any data file at (.*?)\.?$", text)
    if named and os.path.isfile(named.group(1)):
        return _single_file_message(named.group(1), where)
    offline = "Couldn't reach" in text and os.environ.get("HF_HUB_OFFLINE", "") in ("", "0")
    hint = " HF_HUB_OFFLINE=1 makes this fail at once, without the retries." if offline else ""
    return f"The dataset could not be loaded: {text} (in load_dataset, called at {where}). {DATASET_HINT}{hint}"


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
        return _dataset_message(exc, tb)
    if type(exc).__name__ == "HFValidationError" and _through(tb, "datasets"):
        return _dataset_message(exc, tb)
    if isinstance(exc, ValueError) and "doesn't support bf16/gpu" in text:
        return (f"{text.rstrip('.')}: this machine has no GPU with bf16, and TRL's SFTConfig asks for bf16 by "
                "default. Add `--use_cpu` to train on the CPU (the strategy then uses bf16 only if the CPU runs it "
                "natively, else float32).")
    return None
