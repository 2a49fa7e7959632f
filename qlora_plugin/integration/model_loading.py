"""`from_pretrained` while a strategy is active: the model being trained is loaded the way the strategy loads it.

Why: the most widely copied SFT scripts load the model themselves (`AutoModelForCausalLM.from_pretrained(...,
quantization_config=get_quantization_config(model_args))`) and hand `SFTTrainer` the object. Without this, they
would load the full 16-bit model first, the memory QLoRA exists to avoid, only to have it refused.

Which model: the first causal language model (or, for a reward model, sequence classifier) loaded from the
script's `--model_name_or_path` (command line or YAML), or, when the script has no such argument, the first causal
language model it loads. Only that one load
is taken over, once per process: a second model (a frozen reference or teacher, a copy for evaluation) loads
exactly as the script asks. The script's own kwargs are kept (`attn_implementation`, `use_cache`, `revision`,
...); the strategy adds its `BitsAndBytesConfig`, dtype and device map through the same hooks as every other
load (`training.loading`), so the quantized cache applies too. An 8-bit config is refused before any weight is
read.
"""

from __future__ import annotations

import functools
import os

from qlora_plugin.ecosystem.compat import loaded_through_auto
from qlora_plugin.integration import state


def patch_from_pretrained(module) -> None:
    """Wrap `PreTrainedModel.from_pretrained`: a script that calls a model class itself (`LlamaForCausalLM`)."""
    _wrap(module.PreTrainedModel, concrete=True)


def patch_auto_models(module) -> None:
    """Wrap `AutoModelForCausalLM.from_pretrained` (and `AutoModelForSequenceClassification`'s, for a reward
    model): the script's own kwargs, before the Auto class folds some of them (`use_cache`, ...) into a config
    object for the concrete class."""
    _wrap(module.AutoModelForCausalLM, concrete=False)
    _wrap(module.AutoModelForSequenceClassification, concrete=False)


def _wrap(cls, concrete: bool) -> None:
    original = cls.from_pretrained.__func__
    if getattr(original, "_qlora_plugin", False):
        return

    @functools.wraps(original)
    def from_pretrained(klass, pretrained_model_name_or_path, *args, **kwargs):
        # Imported at the first load, not when `import trl` activates the plugin: it loads the training stack.
        from qlora_plugin.training.loading import load_for_script, strategy_loading

        request = state.active_request()
        if (request is None or args or strategy_loading() or (concrete and loaded_through_auto(kwargs))
                or not _is_training_model(klass, pretrained_model_name_or_path, request) or not state.claim_model()):
            return original(klass, pretrained_model_name_or_path, *args, **kwargs)
        return load_for_script(request, klass, str(pretrained_model_name_or_path), kwargs)

    from_pretrained._qlora_plugin = True
    cls.from_pretrained = classmethod(from_pretrained)


def _is_training_model(klass, path, request) -> bool:
    """A causal LM (the first one, when the script names no model), or a reward model's sequence classifier
    loaded from the script's own `--model_name_or_path` (never a scoring model named otherwise)."""
    if _is_causal_lm(klass):
        return request.model_name_or_path is None or _same_model(str(path), request.model_name_or_path)
    return (_is_sequence_classifier(klass) and request.model_name_or_path is not None
            and _same_model(str(path), request.model_name_or_path))


def _is_sequence_classifier(klass) -> bool:
    return any(base.__name__.endswith("ForSequenceClassification") for base in klass.__mro__)


def _is_causal_lm(klass) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = {"AutoModelForCausalLM", *MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()}
    return any(base.__name__ in names or base.__name__.endswith("ForCausalLM") for base in klass.__mro__)


def _same_model(a: str, b: str) -> bool:
    """Two spellings of one model: the same hub id, or the same local folder however it was written."""
    def canonical(name: str) -> str:
        path = os.path.expanduser(name)
        return os.path.realpath(path) if os.path.exists(path) else name.rstrip("/")

    return canonical(a) == canonical(b)
