"""The fidelity check block by block: the same figures as the whole-model check, in the memory of one block.

When: `fidelity.plan_memory` picks it when the whole-model check (every model computed in float32, 4 bytes a
parameter) would not fit the memory of the check's device, e.g. a 70B merge on a machine with twice its 4-bit size
in host memory, or a GPU smaller than the model. Memory then holds one stage at a time in float32 (the embedding,
one decoder block, or the final norm and head), the adapter, and the hidden states of the prompts.

How: the three models the check compares (the adapter, via peft, on the base as training held it; the same with
every weight off by the output dtype's rounding error, the floor; the merged model as written) are built empty, on
the meta device. Stage by stage, each model's weights are read from its safetensors files one tensor at a time (a
4-bit layer of the reference as bitsandbytes' quantize + dequantize of the base weight, which is what training
held), each model's own running hidden state goes through the stage, so errors accumulate as in the whole model,
and the stage goes back to the meta device. The inputs of the first block (attention mask, rotary position
embeddings) are taken from the model's own forward, stopped there, and every stage runs the model's own modules,
so the arithmetic is the whole-model check's (`tests/test_merge_blocks.py` holds the two to the same KL).

Walked: Llama-style decoders whose logits are `lm_head(norm(hidden))` with one attention mask for every block
(`WALKABLE`). Anything else, a reward model's classifier included, keeps the whole-model check (`unwalkable`).
The naive merge into the 16-bit base is not computed on this path (shown only by the whole-model check).
"""

from __future__ import annotations

import os
import re

from qlora_plugin.merge.classifier import is_classifier_config

WALKABLE = ("llama", "mistral", "qwen2", "qwen3")
PEFT_PREFIX = "base_model.model."
FLOOR_STRIDE = 1_000_003  # as `rounding_floor`: a seed per tensor, from its place in the whole model
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def unwalkable(config) -> str | None:
    """Why the block check cannot walk a model of `config` (None: it can)."""
    if is_classifier_config(config):
        return "it is a sequence classifier (its score head reads the last token of each prompt)"
    if getattr(config, "model_type", None) not in WALKABLE:
        return (f"its architecture ({getattr(config, 'model_type', None)}) is not one the block-by-block check "
                f"walks ({', '.join(WALKABLE)})")
    if set(getattr(config, "layer_types", None) or ["full_attention"]) != {"full_attention"}:
        return "its blocks mix attention types (sliding windows), so they do not share one attention mask"
    if getattr(config, "final_logit_softcapping", None):
        return "its logits are soft-capped after the head"
    return None


def stage_params(shapes: dict) -> list[int]:
    """Parameters of each stage the check holds at once, from the checkpoint's shapes by model name: each decoder
    block, and every tensor outside the blocks (embedding, head, norm) on its own."""
    blocks, others = {}, []
    for name, shape in shapes.items():
        count = 1
        for size in shape or ():
            count *= size
        match = _LAYER.search(name)
        if match:
            blocks[match.group(1)] = blocks.get(match.group(1), 0) + count
        else:
            others.append(count)
    return list(blocks.values()) + others


class _Tensors:
    """A checkpoint folder's tensors by the model's parameter names, read one at a time (memory-mapped)."""

    def __init__(self, folder: str, layout):
        from qlora_plugin.merge.inputs import resolve_base

        checkpoint = resolve_base(folder)
        self.folder, self.layout, self.handles = checkpoint.folder, layout, {}
        self.where = {layout.name(key): (file, key) for key, file in checkpoint.files.items()}

    def close(self) -> None:
        """Let go of the files' mappings: the pages read so far would otherwise stay in this process's memory."""
        self.handles.clear()

    def get(self, name: str):
        from safetensors import safe_open

        file, key = self.where[name if name in self.where else self.layout.tied[name]]  # tied: its source's
        if file not in self.handles:
            self.handles[file] = safe_open(os.path.join(self.folder, file), framework="pt")
        return self.handles[file].get_tensor(key)


def _model_name(name: str) -> str:
    """A parameter of the peft-wrapped reference as the base model names it."""
    return name.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".").replace(".original_module.", ".")


def _adapter_key(name: str) -> str:
    """A trained parameter of the peft-wrapped reference as peft saves it in adapter_model.safetensors."""
    key = name.replace(".default", "").replace(".modules_to_save.", ".")
    return key.removesuffix(".weight") if key.endswith(".lora_magnitude_vector.weight") else key


def _skeleton(config):
    """The model of `config` with its parameters on the meta device (buffers real: rotary frequencies), fp32."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()  # as loading does (a tied head is the embedding: one parameter, one rounding error)
    return model


def _place(root, names_values, device) -> list[str]:
    from accelerate.utils import set_module_tensor_to_device

    names = []
    for name, value in names_values:
        set_module_tensor_to_device(root, name, device, value=value)
        names.append(name)
    return names


def _free(root, names) -> None:
    """Empty a stage again, and hand the freed memory back: glibc keeps freed heap memory for reuse, and stage
    after stage that grew the process by 118 MiB a block at a 1B width (docs/merge.md); `malloc_trim` keeps the
    peak at one stage."""
    import ctypes

    from accelerate.utils import set_module_tensor_to_device

    for name in names:
        set_module_tensor_to_device(root, name, "meta")
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


class _Model:
    """One of the compared models, empty; `stage` fills a stage's weights, `free` empties them again."""

    def __init__(self, root, value, device):
        self.root, self.value, self.device = root, value, device
        self.causal = root.get_base_model() if hasattr(root, "get_base_model") else root  # under peft's wrapper
        self.full = {id(m): n for n, m in root.named_modules()}  # a module's name in root
        _place(root, list(root.named_buffers()), device)

    def stage(self, modules) -> list[str]:
        pending = [(f"{self.full[id(m)]}.{n}" if self.full[id(m)] else n, p) for m in modules
                   for n, p in m.named_parameters(remove_duplicate=False)]
        return _place(self.root, [(n, self.value(n)) for n, p in pending if p.is_meta], self.device)

    def params(self, modules):
        for module in modules:
            prefix = self.full[id(module)]
            for name, param in module.named_parameters(remove_duplicate=False):
                yield (f"{prefix}.{name}" if prefix else name), param

    def start(self, batch) -> "_Stream":
        """Run the model's own forward up to its first block: that block's inputs start the stream."""
        captured = {}

        def stop(module, args, kwargs):
            captured.update(args=args, kwargs=kwargs)
            raise _FirstBlock

        handle = self.causal.model.layers[0].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            self.root(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        except _FirstBlock:
            pass
        finally:
            handle.remove()
        kwargs = dict(captured["kwargs"])
        return _Stream(captured["args"][0] if captured["args"] else kwargs.pop("hidden_states"), kwargs)

    def step(self, kind: str, stream, batch, mask, layer=None):
        """One stage of one stream: the first block's inputs, a block's output, or the logits."""
        if kind == "start":
            return self.start(batch)
        if kind == "block":
            out = layer(stream.hidden, **stream.kwargs)
            stream.hidden = out[0] if isinstance(out, tuple) else out
            return stream
        return self.causal.lm_head(self.causal.model.norm(stream.hidden))[mask].float()


class _Stream:
    """A model's running hidden state over the prompts, and the inputs every block takes beside it."""

    def __init__(self, hidden, kwargs):
        self.hidden, self.kwargs = hidden, kwargs


class _FirstBlock(Exception):
    """Raised by the hook on the first block once its inputs are captured."""


def _check_walkable(causal) -> None:
    inner = getattr(causal, "model", None)
    if not all(hasattr(inner, a) for a in ("layers", "embed_tokens", "norm")) or not hasattr(causal, "lm_head"):
        raise RuntimeError(f"{type(causal).__name__} has no model.layers/embed_tokens/norm and lm_head to walk")


def logits(adapter_dir: str, merged_dir: str, base_folder: str, settings: dict | None, out_dtype: str, batch,
           mask, device, floor_seed: int) -> tuple:
    """(reference, rounding floor, merge) logits at the unmasked positions, float32, computed stage by stage."""
    import torch
    from peft import PeftModel
    from safetensors import safe_open

    from qlora_plugin.merge import rounding_floor
    from qlora_plugin.merge.layout import model_layout
    from qlora_plugin.quant.backends import backend_named
    from qlora_plugin.models.model_config import load_config
    from qlora_plugin.ecosystem.notices import library_deprecations

    base_config, merged_config = load_config(base_folder), load_config(merged_dir)
    layout, merged_layout = model_layout(base_config, settings), model_layout(merged_config, None)
    base, written = _Tensors(base_folder, layout), _Tensors(merged_dir, merged_layout)
    loaded = getattr(torch, (settings or {}).get("weight_dtype") or "float32")  # the dtype training loaded
    quantize = None if settings is None else {**settings, "weight_dtype": None}
    backend = None if settings is None else backend_named(settings.get("quant_backend") or "bnb_4bit")

    skeleton = _skeleton(base_config)
    four_bit = [f"{n}.weight" for n, _ in skeleton.named_modules() if f"{n}.weight" in layout.quantized]
    with library_deprecations():
        trained = PeftModel.from_pretrained(skeleton, adapter_dir, low_cpu_mem_usage=True)
    # The floor's seeds, as the whole-model check draws them (`rounding_floor.add_rounding_error`): 4-bit layers
    # by their order in the base, every other parameter by its place in the peft model (a tied one: its first).
    seeds = {name: floor_seed * FLOOR_STRIDE + i for i, name in enumerate(four_bit)}
    firsts = {id(p): i for i, (_, p) in enumerate(trained.named_parameters())}
    by_name = {n: firsts[id(p)] for n, p in trained.named_parameters(remove_duplicate=False)}
    with safe_open(os.path.join(adapter_dir, "adapter_model.safetensors"), framework="pt") as f:
        adapter = {key: f.get_tensor(key) for key in f.keys()}

    def reference_value(name):
        if ".lora_" in name or ".modules_to_save." in name:
            return adapter[_adapter_key(name)].float()  # peft upcasts; the whole-model check calls .float()
        model_name = _model_name(name)
        tensor = base.get(model_name).to(loaded)
        if model_name in layout.quantized:
            return backend.roundtrip(tensor, quantize, device)
        return tensor.float()

    reference = _Model(trained, reference_value, device)
    merged = _Model(_skeleton(merged_config), lambda name: written.get(name).float(), device)
    for model in (reference, merged):
        _check_walkable(model.causal)
    # Every trained tensor now (peft left them on the meta device): held for the whole check, like the adapter.
    _place(trained, [(n, reference_value(n)) for n, p in trained.named_parameters(remove_duplicate=False)
                     if p.is_meta and (".lora_" in n or ".modules_to_save." in n)], device)
    adapter.clear()  # placed in float32: the file's copy is not needed again

    def add_floor(modules):
        """The floor's rounding error on every weight of the stage (the LoRA factors excepted), as the whole-model
        check adds it (4-bit layers: on the dequantized weight, which is what the stage holds)."""
        for name, param in reference.params(modules):
            if param.is_floating_point() and ".lora_" not in name:
                model_name = _model_name(name)
                seed = seeds[model_name] if model_name in layout.quantized else (
                    floor_seed * FLOOR_STRIDE + len(four_bit) + by_name[name])
                param.data += rounding_floor.rounding_error(param.data, out_dtype, seed).to(param.dtype)

    with torch.no_grad():
        stages = [("start", [reference.causal.model.embed_tokens], [merged.causal.model.embed_tokens])]
        stages += [("block", [a], [b]) for a, b in zip(reference.causal.model.layers, merged.causal.model.layers)]
        stages.append(("end", [reference.causal.model.norm, reference.causal.lm_head],
                       [merged.causal.model.norm, merged.causal.lm_head]))
        streams = {}
        for kind, ours, theirs in stages:
            placed = reference.stage(ours)
            streams["reference"] = reference.step(kind, streams.get("reference"), batch, mask, ours[0])
            add_floor(ours)
            streams["floor"] = reference.step(kind, streams.get("floor"), batch, mask, ours[0])
            _free(reference.root, placed)
            placed = merged.stage(theirs)
            streams["merge"] = merged.step(kind, streams.get("merge"), batch, mask, theirs[0])
            _free(merged.root, placed)
            base.close(), written.close()
    return streams["reference"], streams["floor"], streams["merge"]
