"""`qlora-plugin merge`: fold a QLoRA adapter into the weights it was trained against, and write an ordinary
transformers checkpoint (safetensors, config, tokenizer) that loads with nothing of ours installed.

Why not merge into the original 16-bit weights, as most tools do: during training every linear layer that
bitsandbytes quantized was seen as dequant(quant(W)), never W, and the adapter learnt to correct *that* model.
Quantization is deterministic, so re-quantizing the original base with the settings training recorded
(`quant/record.py`) rebuilds it exactly; the merged weight of such a layer is dequant(quant(W)) + scale * B @ A.
Which layers were quantized is decided by transformers' own bitsandbytes quantizer on an empty (meta) copy of
the model, so the rule is always the one training used.

Large models: the base is streamed tensor by tensor from its safetensors files and written out shard by shard,
so memory holds about one output shard.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from dataclasses import dataclass

from qlora_plugin.errors import QLoRAPluginError
from qlora_plugin.merge import fidelity
from qlora_plugin.merge.classifier import as_classifier, model_class
from qlora_plugin.merge.inputs import TOKENIZER_FILES, Adapter, BaseCheckpoint, load_adapter, open_base_file, resolve_base
from qlora_plugin.merge.writer import ShardWriter, check_output, disk_error, staged_folder
from qlora_plugin.model_config import load_config
from qlora_plugin.options import StrategyOptions
from qlora_plugin.quant.layers import four_bit_module_names
from qlora_plugin.quant.record import RECORD_FILE, read_record

logger = logging.getLogger(__name__)

MERGE_DTYPES = ("bfloat16", "float16", "float32")
DEFAULT_MAX_SHARD_SIZE = "2GB"


@dataclass
class Layout:
    """The model as training built it, in the model's parameter names."""

    params: set  # every parameter name
    quantized: set  # weights training held in 4-bit
    conv1d: set  # weights stored (in, out): GPT-2's Conv1D
    tied: dict  # tied parameter -> the parameter it shares
    prefix: str  # base_model_prefix (checkpoints may omit it)

    def name(self, key: str) -> str:
        """A checkpoint key as the model's parameter name."""
        if key in self.params or not self.prefix or f"{self.prefix}.{key}" not in self.params:
            return key
        return f"{self.prefix}.{key}"


def quant_settings(adapter: Adapter, quant_type=None, double_quant=None) -> dict | None:
    """The 4-bit settings training used (None: the base was 16-bit): the record, then the flags on top."""
    record = read_record(adapter.folder)
    recorded = record is not None
    if not recorded:
        defaults = StrategyOptions()
        record = {"load_in_4bit": True, "bnb_4bit_quant_type": defaults.bnb_4bit_quant_type,
                  "bnb_4bit_use_double_quant": defaults.use_bnb_nested_quant, "blocksize": 64, "weight_dtype": None}
        if quant_type is None or double_quant is None:
            logger.warning(
                "[qlora-plugin] %s has no %s (the adapter was not saved by a qlora-plugin run); assuming the strategy "
                "defaults (nf4, double quant, blocksize 64, weights quantized in their stored dtype). Override with "
                "--bnb_4bit_quant_type / --use_bnb_nested_quant.", adapter.folder, RECORD_FILE)
    elif not record["load_in_4bit"]:
        if quant_type is not None or double_quant is not None:
            raise QLoRAPluginError(
                f"{RECORD_FILE} says this adapter was trained on a 16-bit base, so there is no 4-bit setting to "
                "override; drop --bnb_4bit_quant_type / --use_bnb_nested_quant."
            )
        return None
    for key, value in (("bnb_4bit_quant_type", quant_type), ("bnb_4bit_use_double_quant", double_quant)):
        if value is not None and value != record.get(key):
            if recorded:
                logger.warning("[qlora-plugin] training recorded %s=%s; using %s as asked.", key, record.get(key), value)
            record[key] = value
    return record


def model_layout(config, settings: dict | None) -> Layout:
    """Build an empty copy of the model; the 4-bit layers are the ones transformers' bitsandbytes rule picks."""
    import torch
    from transformers.pytorch_utils import Conv1D

    try:
        with torch.device("meta"):
            model = model_class(config).from_config(config)  # a causal LM, or a reward model's classifier
    except (ValueError, KeyError) as err:
        raise QLoRAPluginError(f"transformers cannot build a causal LM from this config ({err}).") from None
    conv1d = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, Conv1D)}
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    quantized = set()
    if settings is not None:
        quantized = {f"{n}.weight" for n in four_bit_module_names(model, settings.get("llm_int8_skip_modules"))}
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return Layout(params, quantized, conv1d, tied, getattr(model, "base_model_prefix", ""))


def _math_shape(shape, transposed):
    return tuple(reversed(shape)) if transposed else tuple(shape)


def check_fit(adapter: Adapter, base: BaseCheckpoint, layout: Layout, heads=()) -> dict:
    """Every adapter tensor must land on a base tensor of the right shape (`heads`: a classifier's, which only the
    adapter has). Returns checkpoint shapes by name."""
    shapes = {name: tuple(adapter.replacements[name].shape) for name in heads}
    for file in sorted(set(base.files.values())):
        with open_base_file(base, file) as f:
            shapes.update({layout.name(key): tuple(f.get_slice(key).get_shape()) for key in f.keys()})
    for target, source in layout.tied.items():
        shapes.setdefault(target, shapes.get(source))
    where = f"the base {base.folder}" + (f" (the adapter records {adapter.base_name})" if adapter.base_name else "")

    def mismatch(what, got, want):
        return QLoRAPluginError(
            f"The adapter does not fit {where}: {what} is {list(got)} but the base needs {list(want)}. It was "
            "trained on a model of another shape or architecture; pass that model with --base."
        )

    for module, entry in adapter.lora.items():
        name = f"{module}.weight"
        if shapes.get(name) is None:
            raise QLoRAPluginError(
                f"The adapter adapts `{module}`, which {where} does not have. It was trained on another "
                "architecture; pass the model it was trained on with --base."
            )
        a, b = tuple(entry["A"].shape), tuple(entry["B"].shape)
        if entry["embedding"]:
            rows, cols = shapes[name]
            want_a, want_b = (a[0], rows), (cols, a[0])
        else:
            out_f, in_f = _math_shape(shapes[name], name in layout.conv1d)
            want_a, want_b = (a[0], in_f), (out_f, a[0])
        if a != want_a:
            raise mismatch(f"`{module}` lora_A", a, want_a)
        if b != want_b:
            raise mismatch(f"`{module}` lora_B", b, want_b)
        if entry.get("magnitude") is not None and tuple(entry["magnitude"].shape) != (want_b[0],):
            raise mismatch(f"`{module}` lora_magnitude_vector", entry["magnitude"].shape, (want_b[0],))
    for name, tensor in adapter.replacements.items():
        if shapes.get(name) is None:
            raise QLoRAPluginError(f"The adapter saves `{name}` in full, but {where} has no such tensor.")
        if tuple(tensor.shape) != shapes[name]:
            raise mismatch(f"`{name}` (saved in full)", tensor.shape, shapes[name])
    return shapes


def nf4_roundtrip(weight, settings: dict):
    """dequant(quant(W)) exactly as bitsandbytes computed it when training loaded the base (fp32 result)."""
    import torch
    import bitsandbytes.functional as F

    dtype = getattr(torch, settings["weight_dtype"]) if settings.get("weight_dtype") else weight.dtype
    # Quantize where training did (the recorded device; unrecorded: the GPU if there is one).
    device = "cuda" if torch.cuda.is_available() and settings.get("device_type", "cuda") == "cuda" else "cpu"
    packed, state = F.quantize_4bit(
        weight.to(device=device, dtype=dtype).contiguous(), blocksize=settings.get("blocksize", 64),
        compress_statistics=settings["bnb_4bit_use_double_quant"], quant_type=settings["bnb_4bit_quant_type"],
    )
    return F.dequantize_4bit(packed, state).float().cpu()


def _as_loaded(tensor, settings: dict | None):
    """A tensor training did not quantize, with the values training held: the whole base was loaded in the
    recorded `weight_dtype` (bf16 on hardware with native bf16), and upcast from there if at all."""
    import torch

    if settings is None or not settings.get("weight_dtype") or not tensor.is_floating_point():
        return tensor
    return tensor.to(getattr(torch, settings["weight_dtype"])).to(tensor.dtype)


def merged_tensor(name: str, tensor, adapter: Adapter, layout: Layout, settings: dict | None):
    """The final value of one parameter (checkpoint orientation, fp32 when changed; else the tensor as is)."""
    if name in adapter.replacements:
        return adapter.replacements[name]
    module = name.removesuffix(".weight")
    entry = adapter.lora.get(module) if name.endswith(".weight") else None
    quantized = settings is not None and name in layout.quantized
    if entry is None and not quantized:
        return _as_loaded(tensor, settings)
    transposed = name in layout.conv1d
    weight = tensor.T if transposed else tensor  # (out, in), the orientation bitsandbytes quantizes
    weight = nf4_roundtrip(weight, settings) if quantized else _as_loaded(weight, settings).float()
    if entry is not None:
        a, b = entry["A"].float(), entry["B"].float()
        delta = (b @ a).T if entry["embedding"] else b @ a
        weight = weight + adapter.scaling(module) * delta
        if entry.get("magnitude") is not None:  # DoRA: magnitude * direction, row norms of the adapted weight
            weight = (entry["magnitude"].float() / weight.norm(p=2, dim=1)).unsqueeze(1) * weight
    return weight.T if transposed else weight


def _copy_side_files(base_folder: str, adapter_folder: str, tmp: str) -> None:
    own_tokenizer = any(os.path.isfile(os.path.join(adapter_folder, n)) for n in TOKENIZER_FILES[:2])
    source = adapter_folder if own_tokenizer else base_folder
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(source, name)):
            shutil.copyfile(os.path.join(source, name), os.path.join(tmp, name))
    if os.path.isfile(os.path.join(base_folder, "generation_config.json")):
        shutil.copyfile(os.path.join(base_folder, "generation_config.json"), os.path.join(tmp, "generation_config.json"))


def _write_config(config, tmp: str, dtype, untie: bool) -> None:
    config.dtype = dtype
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if untie:
        config.tie_word_embeddings = False
    config.save_pretrained(tmp)


def _output_dtype(config, asked: str | None):
    """`--dtype`, else the base's own 16-bit dtype, else float32."""
    import torch

    if asked:
        return getattr(torch, asked)
    stored = getattr(config, "dtype", None)
    stored = getattr(torch, stored, None) if isinstance(stored, str) else stored
    return stored if stored in (torch.bfloat16, torch.float16) else torch.float32


def _check_layer_count(settings: dict | None, layout: Layout) -> None:
    recorded = (settings or {}).get("layers_4bit")
    if recorded is not None and recorded != len(layout.quantized):
        raise QLoRAPluginError(
            f"Training held {recorded} layers in 4-bit, but transformers' quantizer here picks "
            f"{len(layout.quantized)} for this base, so the merge could not rebuild the model the adapter was "
            "trained against. Check --base, or merge with the transformers version used for training."
        )


def _stream(checkpoint: BaseCheckpoint, layout: Layout, adapter: Adapter, settings, extra: list, emit) -> None:
    """Every base tensor, one at a time, merged and handed to `emit`; with a progress bar."""
    from tqdm.auto import tqdm

    by_file = {}
    for key, file in checkpoint.files.items():
        by_file.setdefault(file, []).append(key)
    with tqdm(total=len(checkpoint.files) + len(extra), desc="merging", unit="tensor") as bar:
        for file, keys in by_file.items():
            with open_base_file(checkpoint, file) as f:
                for key in keys:
                    name, tensor = layout.name(key), f.get_tensor(key)
                    emit(key, merged_tensor(name, tensor, adapter, layout, settings))
                    for target in (t for t in extra if layout.tied[t] == name):  # untied: a tensor of its own
                        emit(target, merged_tensor(target, tensor, adapter, layout, None))
                        bar.update()
                    bar.update()


def merge(adapter_dir: str, out: str, base: str | None = None, dtype: str | None = None, force: bool = False,
          quant_type: str | None = None, double_quant: bool | None = None,
          max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE, check: bool = True, eval_data: str | None = None) -> dict:
    """Merge the adapter in `adapter_dir` into its base and write the model to `out`. Returns a summary.

    Everything is checked before the first byte is written; the output appears at `out` only when complete and,
    with `check`, only when its fidelity check passed (`merge/fidelity.py`; `merge_report.json` beside it). A
    merge that fails the check is left at `<out>.incomplete` for inspection, and a `QLoRAPluginError` says why.
    """
    check_output(out, force)
    if check:
        fidelity.load_prompts(eval_data)  # a bad --eval_data fails before anything is written
    if dtype is not None and dtype not in MERGE_DTYPES:
        raise QLoRAPluginError(f"--dtype must be one of {', '.join(MERGE_DTYPES)}; got {dtype!r}.")
    adapter = load_adapter(adapter_dir)

    import torch
    from transformers.utils.hub import convert_file_size_to_int

    try:
        shard_bytes = convert_file_size_to_int(max_shard_size)
    except ValueError:
        raise QLoRAPluginError(f"--max_shard_size must be a size such as 2GB or 500MB; got {max_shard_size!r}.") from None
    base_name = base or adapter.base_name
    if not base_name:
        raise QLoRAPluginError(
            f"{adapter_dir}/adapter_config.json records no base model; pass the model it was trained on with --base."
        )
    checkpoint = resolve_base(base_name)
    settings = quant_settings(adapter, quant_type, double_quant)
    config = load_config(checkpoint.folder)
    heads = as_classifier(config, adapter)
    layout = model_layout(config, settings)
    if heads:  # the base's tensors a classifier has no place for (its lm_head) are left out
        checkpoint = BaseCheckpoint(checkpoint.folder, {k: f for k, f in checkpoint.files.items()
                                                        if layout.name(k) in layout.params})
    _check_layer_count(settings, layout)
    shapes = check_fit(adapter, checkpoint, layout, heads)
    touched = set(adapter.replacements) | {f"{m}.weight" for m in adapter.lora}
    untie = bool(touched & (set(layout.tied) | set(layout.tied.values())))
    written = set(map(layout.name, checkpoint.files))
    extra = [t for t in layout.tied if untie and t not in written and shapes.get(t)]

    out_dtype = _output_dtype(config, dtype)
    needed = sum(torch.Size(s).numel() for n, s in shapes.items() if s and (n in written or n in extra))
    needed *= torch.empty((), dtype=out_dtype).element_size()
    parent = os.path.dirname(os.path.abspath(out))
    if os.path.isdir(parent) and shutil.disk_usage(parent).free < needed:
        raise disk_error(OSError(errno.ENOSPC, "No space left on device"), out, needed)
    try:
        with staged_folder(out, force) as tmp:
            writer = ShardWriter(tmp, shard_bytes)
            _stream(checkpoint, layout, adapter, settings, extra,
                    lambda key, value: writer.add(key, value.to(out_dtype) if value.is_floating_point() else value))
            for name in heads:
                writer.add(name, adapter.replacements[name].to(out_dtype))
            writer.finish()
            _write_config(config, tmp, out_dtype, untie)
            _copy_side_files(checkpoint.folder, adapter.folder, tmp)
            # The reference is what was trained: the recorded settings, not overrides given to this merge.
            trained = quant_settings(adapter) if read_record(adapter.folder) is not None else settings
            report = _check(adapter, tmp, out, checkpoint.folder, trained, out_dtype, eval_data) if check else None
    except OSError as err:
        raise disk_error(err, out, needed) from None
    return {
        "out": out, "base": checkpoint.folder, "dtype": str(out_dtype).replace("torch.", ""),
        "adapted_layers": len(adapter.lora), "requantized_layers": len(layout.quantized & written),
        "quantization": None if settings is None else {k: settings.get(k) for k in (
            "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "blocksize", "weight_dtype")},
        "bytes": writer.total_bytes, "shards": len(writer.shards), "untied": untie, "fidelity": report,
    }


def _check(adapter: Adapter, tmp: str, out: str, base_folder: str, settings, out_dtype, eval_data) -> dict:
    """The fidelity check on the written folder, before it is put in place; a failure keeps it apart."""
    report = fidelity.check(adapter.folder, tmp, base_folder, settings, str(out_dtype).replace("torch.", ""),
                            eval_data)
    fidelity.write_report(tmp, report)
    if not report["passed"]:
        incomplete = os.path.abspath(out) + ".incomplete"
        shutil.rmtree(incomplete, ignore_errors=True)
        os.replace(tmp, incomplete)
        raise QLoRAPluginError(
            f"The merged model failed its fidelity check ({'; '.join(report['failures'])}), so it was not written "
            f"to {out}. It is in {incomplete} with {fidelity.REPORT_FILE}. Check that --base is the model the "
            "adapter was trained on and that the recorded quantization matches; --no_check skips the check."
        )
    return report
