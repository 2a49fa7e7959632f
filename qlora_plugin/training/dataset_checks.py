"""Before a strategy loads a model: is the training data something `SFTTrainer` can train on?

TRL finds out only while tokenizing, after the model is loaded, and then says `KeyError: 'text'`. Checked here
from the column names alone (no rows are read); streaming datasets without known columns are left to TRL.
"""

from __future__ import annotations

from qlora_plugin.core.errors import QLoRAPluginError


def usable_columns(columns, text_field: str) -> bool:
    """TRL's SFT formats: plain text, chat `messages`, `prompt` + `completion`, or already tokenized."""
    names = set(columns)
    return bool({text_field, "messages", "input_ids"} & names) or {"prompt", "completion"} <= names


def check_sft_datasets(trainer_kwargs: dict, args) -> None:
    if trainer_kwargs.get("formatting_func") is not None:
        return
    if (getattr(args, "dataset_kwargs", None) or {}).get("skip_prepare_dataset"):
        return
    text_field = getattr(args, "dataset_text_field", "text") or "text"
    for which in ("train_dataset", "eval_dataset"):
        datasets = trainer_kwargs.get(which)
        named = [(which, datasets)]
        if isinstance(datasets, dict):
            named = [(f"{which}[{key!r}]", dataset) for key, dataset in datasets.items()]
        for name, dataset in named:
            columns = getattr(dataset, "column_names", None)
            if isinstance(columns, list) and not usable_columns(columns, text_field):
                raise QLoRAPluginError(
                    f"The {name} has columns {columns}; SFTTrainer needs `{text_field}` (plain text), `messages` "
                    "(chat), `prompt` + `completion`, or `input_ids` (already tokenized). Rename a column "
                    "(`dataset.rename_column`), name the text column with `--dataset_text_field`, or pass a "
                    "`formatting_func`."
                )
