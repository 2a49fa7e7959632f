"""What peft's k-bit preparation costs in embeddings and head, and what the strategy keeps: measured on CPU.

    python examples/bench/embedding_memory.py              # Llama 3.1 8B's vocabulary and width, 1 decoder layer
    python examples/bench/embedding_memory.py --layers 2

Builds a Llama with Llama 3.1 8B's shape (hidden 4096, vocabulary 128,256, untied head) but few decoder layers
(the embeddings and the head are what differ; the layers are the same either way), saves it in bf16, loads it in
4-bit with bf16 compute as the strategy does, then prepares it for training twice: with peft's
`prepare_model_for_kbit_training` alone (everything that is not 4-bit upcast to fp32) and with the strategy's
`wrap_with_lora` (embeddings and head kept bf16, norms fp32). Prints the bytes of the frozen weights and the
dtypes of the embeddings, head and norms. Needs about 10 GB of memory and a few minutes.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

OUT = Path(__file__).resolve().parent / "output" / "embedding-memory"
LLAMA_31_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                   vocab_size=128256, tie_word_embeddings=False)


def build(layers: int) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    path = OUT / f"llama31-8b-shape-{layers}-layers"
    if not (path / "config.json").exists():
        model = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA_31_8B, num_hidden_layers=layers),
                                                 dtype=torch.bfloat16)
        model.save_pretrained(path)
    return path


def frozen_bytes(model) -> int:
    frozen = [p for p in model.parameters() if not p.requires_grad]
    return sum(t.numel() * t.element_size() for t in [*frozen, *model.buffers()])


def dtypes(model) -> str:
    norms = {str(p.dtype) for n, p in model.named_parameters() if "norm" in n}
    return (f"embeddings {model.get_input_embeddings().weight.dtype}, head {model.get_output_embeddings().weight.dtype}"
            f", norms {', '.join(sorted(norms))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=1)
    args = parser.parse_args()

    from peft import prepare_model_for_kbit_training
    from trl.trainer.utils import create_model_from_path

    from qlora_plugin.core.options import StrategyOptions
    from qlora_plugin.quant.config import model_init_kwargs
    from qlora_plugin.ecosystem.runtime import Runtime
    from qlora_plugin.strategies.adapters import wrap_with_lora

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = build(args.layers)
    runtime, options = Runtime("cpu", bf16_native=True, engine="none"), StrategyOptions()
    kwargs = model_init_kwargs(options, {}, runtime)  # NF4 + double quant, bf16 compute and load dtype

    peft_alone = prepare_model_for_kbit_training(create_model_from_path(str(path), **kwargs),
                                                 use_gradient_checkpointing=False)
    before, before_dtypes = frozen_bytes(peft_alone), dtypes(peft_alone)
    del peft_alone
    strategy = wrap_with_lora(create_model_from_path(str(path), **kwargs), options, runtime).get_base_model()
    after = frozen_bytes(strategy)
    head = strategy.get_input_embeddings().weight.numel() + strategy.get_output_embeddings().weight.numel()
    print(f"Llama 3.1 8B shape, {args.layers} decoder layer(s), {head / 1e9:.3f}B embedding + head parameters")
    print(f"peft's preparation alone : {before / 2**30:.3f} GiB frozen weights ({before_dtypes})")
    print(f"the strategy             : {after / 2**30:.3f} GiB frozen weights ({dtypes(strategy)})")
    print(f"difference               : {(before - after) / 2**30:.3f} GiB = {(before - after) / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
