"""Build a small, randomly initialised causal LM and its BPE tokenizer, offline, for demos and tests.

Real users pass real models; this exists so the demo, the tests and a machine without Hub access can exercise
the real loading path (`from_pretrained` on a folder of safetensors) in seconds. The tokenizer has a small chat
template (`CHAT_TEMPLATE`), so chat `messages` data trains as well as prompt/completion or plain text.
"""

from __future__ import annotations

import json
import os
import tempfile

from qlora_plugin.core.errors import QLoRAPluginError
from qlora_plugin.core.files import give_normal_permissions

ARCHITECTURES = ("llama", "gpt2", "phi3")
TEXT_FIELDS = ("prompt", "completion", "text", "messages")  # TRL's SFT formats, plain or conversational
# Each turn as `<|role|>`, its content and the end-of-sequence token: with `add_generation_prompt` a prompt ends
# where the assistant's turn starts, so TRL's prompt-completion and `messages` formats both work.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def _row_text(row: dict) -> str:
    """The text of one JSONL row in any of TRL's formats: strings as they are, chat turns by role and content."""
    parts = []
    for key in TEXT_FIELDS:
        value = row.get(key)
        if isinstance(value, list):  # conversational: a list of {"role", "content"} turns
            parts += [f"<|{turn.get('role')}|> {turn.get('content')}" for turn in value if isinstance(turn, dict)]
        elif value is not None:
            parts.append(str(value))
    return " ".join(parts)


def _corpus(data_files) -> list[str]:
    texts = []
    for path in data_files:
        try:
            with open(path, encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    texts.append(_row_text(json.loads(line)))
        except OSError as err:
            raise QLoRAPluginError(f"Data file {path!r} cannot be read ({err.strerror or err}).") from None
        except (ValueError, TypeError) as err:  # not JSON, or a line that is not an object
            raise QLoRAPluginError(
                f"Data file {path!r}, line {number}: not a JSON object ({err}). Pass JSONL files with one object "
                "per line (prompt/completion, text or messages fields)."
            ) from None
    return texts


def build_tokenizer(texts, vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on `texts` in about a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,  # blank lines when not a tty
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
    )


def model_config(arch: str, vocab_size: int, hidden_size: int = 128, layers: int = 2, intermediate_size=None,
                 heads: int = 4, tokenizer=None):
    from transformers import GPT2Config, LlamaConfig, Phi3Config

    if arch not in ARCHITECTURES:
        raise QLoRAPluginError(f"arch must be one of {', '.join(ARCHITECTURES)}; got {arch!r}.")
    if hidden_size % heads:
        raise QLoRAPluginError(f"hidden size {hidden_size} must be a multiple of the {heads} attention heads.")
    intermediate_size = intermediate_size or 2 * hidden_size
    special = {}
    if tokenizer is not None:
        special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    # A random base with the usual 0.02 init has a frozen lm_head too weak for LoRA alone to make confident
    # predictions; 0.2 lets the demo and the learning test show the loss falling within a minute.
    special["initializer_range"] = 0.2
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=hidden_size, n_layer=layers, n_head=heads,
                          n_inner=intermediate_size, n_positions=256, **special)
    cls = LlamaConfig if arch == "llama" else Phi3Config
    return cls(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=layers,
               num_attention_heads=heads, num_key_value_heads=heads, intermediate_size=intermediate_size,
               max_position_embeddings=256, tie_word_embeddings=False, **special)


def build_tiny_model(out_dir: str, arch: str = "llama", data_files=(), hidden_size: int = 128, layers: int = 2,
                     intermediate_size=None, heads: int = 4, vocab_size: int = 512, seed: int = 0) -> str:
    """Write a model folder (config.json, model.safetensors, tokenizer) to `out_dir` and return it."""
    import torch
    from transformers import AutoModelForCausalLM

    texts = _corpus(data_files) if data_files else ["hello world"] * 10
    tokenizer = build_tokenizer(texts, vocab_size)
    config = model_config(arch, len(tokenizer), hidden_size, layers, intermediate_size, heads, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=parent, prefix=".tiny-model-") as tmp:  # never a half-written folder
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        give_normal_permissions(tmp)  # safetensors writes model.safetensors 0600
        os.makedirs(out_dir, exist_ok=True)
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    return out_dir
