"""Merging a reward model's adapter (peft task type `SEQ_CLS`, what `trl reward --strategy qlora` trains): the output
is a sequence classifier, not a causal LM.

The base checkpoint is a causal LM: its transformer blocks are the classifier's, its `lm_head` has no place in it,
and the one-output `score` head exists only in the adapter (trained in full, `modules_to_save`). So the merged
folder holds the blocks merged as for any adapter, the adapter's `score` head, no `lm_head`, and a config naming
`<Model>ForSequenceClassification` with the head's number of labels.
"""

from __future__ import annotations

from qlora_plugin.core.errors import QLoRAPluginError

SEQ_CLS = "SEQ_CLS"
HEAD = "score.weight"  # the head transformers' *ForSequenceClassification models have (peft saves it in full)


def is_classifier_adapter(adapter_config: dict) -> bool:
    return str(adapter_config.get("task_type") or "").upper() == SEQ_CLS


def as_classifier(config, adapter) -> list[str]:
    """For a `SEQ_CLS` adapter, turn the base's `config` into its classifier's and return the head tensors the
    adapter adds (written after the base's); for any other adapter, leave `config` alone and return []."""
    if not is_classifier_adapter(adapter.config):
        return []
    head = adapter.replacements.get(HEAD)
    architecture = (getattr(config, "architectures", None) or [""])[0]
    if head is None or not architecture.endswith("ForCausalLM"):
        raise QLoRAPluginError(
            f"{adapter.folder} is a sequence-classification adapter (task_type SEQ_CLS) but "
            + (f"saves no `{HEAD}` head" if head is None else f"its base is a {architecture or 'model of no named'} "
               "architecture, not a causal LM")
            + "; merge writes classifiers only for a `score` head on a causal-LM base (what `trl reward` trains)."
        )
    config.architectures = [architecture.removesuffix("ForCausalLM") + "ForSequenceClassification"]
    config.num_labels = int(head.shape[0])
    if getattr(config, "pad_token_id", None) is None:  # batches of more than one need it to find each last token
        config.pad_token_id = getattr(config, "eos_token_id", None) if not isinstance(
            getattr(config, "eos_token_id", None), list) else config.eos_token_id[0]
    return [HEAD]


def is_classifier_config(config) -> bool:
    return (getattr(config, "architectures", None) or [""])[0].endswith("ForSequenceClassification")


def model_class(config):
    """The transformers Auto class that builds `config`'s model: a classifier after `as_classifier`."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if is_classifier_config(config) else AutoModelForCausalLM
