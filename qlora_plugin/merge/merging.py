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

from qlora_plugin.core.errors import QLoRAPluginError
from qlora_plugin.merge import fidelity
from qlora_plugin.merge.classifier import as_classifier
from qlora_plugin.merge.layout import Layout, model_layout  # noqa: F401 - Layout: the type merge passes on
from qlora_plugin.merge.inputs import (TOKENIZER_FILES, Adapter, BaseCheckpoint, check_record, load_adapter,
                                      open_base_file, resolve_base)
from qlora_plugin.core.files import write_json_atomic
from qlora_plugin.merge.writer import MARKER_FILE, ShardWriter, check_output, disk_error, staged_folder
from qlora_plugin.models.model_config import load_config
from qlora_plugin.core.options import StrategyOptions
from qlora_plugin.quant.backends import backend_named
from qlora_plugin.quant.record import RECORD_FILE, read_record

logger = logging.getLogger(__name__)

MERGE_DTYPES = ("bfloat16", "float16", "float32")
DEFAULT_MAX_SHARD_SIZE = "2GB"


def quant_settings(adapter: Adapter, quant_type=None, double_quant=None, trained_on=None) -> dict | None:
    """The 4-bit settings training used (None: the base was 16-bit): the record, then the flags on top.

    Without a record (an adapter trained elsewhere) nothing tells a QLoRA adapter from a 16-bit LoRA one, and
    merging either into the other's base is silently wrong (a 16-bit adapter on the NF4 base moves every layer by
    the quantization error; the check cannot see it, its reference makes the same guess), so the user names it:
    `--trained_on 4bit|16bit`, a 4-bit flag, or a LoftQ start in the adapter's config (peft's LoftQ is 4-bit)."""
    record = read_record(adapter.folder)
    if record is not None:
        check_record(record, os.path.join(adapter.folder, RECORD_FILE))
    backend = backend_named(record.get("quant_backend")) if record else None
    if backend is not None and backend.name != "bnb_4bit":  # LoRA on another quantized base (lora-int8)
        return _other_backend_settings(record, adapter, backend, quant_type, double_quant, trained_on)
    if record is not None:
        if trained_on is not None and (trained_on == "4bit") != record["load_in_4bit"]:
            raise QLoRAPluginError(
                f"--trained_on {trained_on} contradicts {RECORD_FILE}, which says training held the base in "
                f"{'4' if record['load_in_4bit'] else '16'}-bit; drop --trained_on (the record is what training did)."
            )
    else:
        loftq = adapter.config.get("init_lora_weights") == "loftq" or bool(adapter.config.get("loftq_config"))
        four_bit_asked = quant_type is not None or double_quant is not None or loftq
        if trained_on is None and not four_bit_asked:
            raise QLoRAPluginError(
                f"{adapter.folder} has no {RECORD_FILE} (the adapter was not saved by a qlora-plugin run), so merge "
                "cannot tell whether it was trained on a 4-bit base (QLoRA) or a 16-bit one (LoRA). Pass "
                "--trained_on 4bit (nf4, double quant, blocksize 64; --bnb_4bit_quant_type / --use_bnb_nested_quant "
                "to change them) or --trained_on 16bit."
            )
        if trained_on == "16bit" and four_bit_asked:
            raise QLoRAPluginError(
                "--trained_on 16bit contradicts " + ("the adapter's LoftQ start (peft's LoftQ is for 4-bit bases)"
                                                     if loftq else "--bnb_4bit_quant_type / --use_bnb_nested_quant")
                + "; drop one of them."
            )
        defaults = StrategyOptions()
        record = {"load_in_4bit": trained_on != "16bit", "bnb_4bit_quant_type": defaults.bnb_4bit_quant_type,
                  "bnb_4bit_use_double_quant": defaults.use_bnb_nested_quant, "blocksize": 64, "weight_dtype": None}
        if record["load_in_4bit"] and (quant_type is None or double_quant is None):
            logger.warning(
                "[qlora-plugin] %s has no %s; merging as 4-bit with the strategy defaults where no flag says "
                "otherwise (nf4, double quant, blocksize 64, weights quantized in their stored dtype).",
                adapter.folder, RECORD_FILE)
    if not record["load_in_4bit"]:
        if quant_type is not None or double_quant is not None:
            raise QLoRAPluginError(
                "This adapter was trained on a 16-bit base, so there is no 4-bit setting to override; drop "
                "--bnb_4bit_quant_type / --use_bnb_nested_quant."
            )
        return None
    for key, value in (("bnb_4bit_quant_type", quant_type), ("bnb_4bit_use_double_quant", double_quant)):
        if value is not None and value != record.get(key):
            if read_record(adapter.folder) is not None:
                logger.warning("[qlora-plugin] training recorded %s=%s; using %s as asked.", key, record.get(key), value)
            record[key] = value
    return record


def _other_backend_settings(record: dict, adapter: Adapter, backend, quant_type, double_quant, trained_on) -> dict:
    """The settings of a base another backend than bitsandbytes 4-bit quantized (int8 for `lora-int8`): the record,
    with no 4-bit flag to apply to it."""
    path = os.path.join(adapter.folder, RECORD_FILE)
    if quant_type is not None or double_quant is not None or trained_on is not None:
        raise QLoRAPluginError(
            f"This adapter was trained on {backend.article} {backend.label} base ({path}), so --bnb_4bit_quant_type, "
            "--use_bnb_nested_quant and --trained_on do not apply; drop them (the record is what training did)."
        )
    return dict(record)


def _quantization_summary(settings: dict | None) -> dict | None:
    """The settings the merge rebuilt the base with, as its summary and marker file say them."""
    if settings is None:
        return None
    if _backend(settings).name == "bnb_4bit":
        return {k: settings.get(k) for k in ("bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "blocksize",
                                             "weight_dtype")}
    return {"quant_backend": _backend(settings).name, "weight_dtype": settings.get("weight_dtype")}


def _backend(settings: dict | None):
    """The backend that rebuilds the base training held (records before backends existed: bitsandbytes 4-bit)."""
    return None if settings is None else backend_named(settings.get("quant_backend") or "bnb_4bit")


def _math_shape(shape, transposed):
    return tuple(reversed(shape)) if transposed else tuple(shape)


def check_fit(adapter: Adapter, base: BaseCheckpoint, layout: Layout, heads=()) -> dict:
    """Every adapter tensor must land on a base tensor of the right shape. Returns checkpoint shapes by name."""
    shapes = {name: tuple(adapter.replacements[name].shape) for name in heads}  # a classifier's, adapter-only
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


def nf4_roundtrip(weight, settings: dict, device=None):
    """dequant(quant(W)) exactly as bitsandbytes computed it when training loaded the base (fp32 result). On
    `device` when given (the fidelity check's: the result stays there), else where training quantized (the
    recorded device; unrecorded: the GPU if there is one), the result on the CPU."""
    return backend_named("bnb_4bit").roundtrip(weight, settings, device)


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
    weight = _backend(settings).roundtrip(weight, settings) if quantized else _as_loaded(weight, settings).float()
    if entry is not None:
        a, b = entry["A"].float(), entry["B"].float()
        delta = (b @ a).T if entry["embedding"] else b @ a
        weight = weight + adapter.scaling(module) * delta
        if entry.get("magnitude") is not None:  # DoRA: magnitude * direction, row norms of the adapted weight
            weight = (entry["magnitude"].float() / weight.norm(p=2, dim=1)).unsqueeze(1) * weight
    return weight.T if transposed else weight


def _side_files(base_folder: str, adapter_folder: str) -> list[tuple[str, str]]:
    """(source, name) of the tokenizer and generation-config files to copy: the adapter's tokenizer when it saved
    one, else the base's. From the adapter folder only regular files are taken, never a symbolic link (it could
    point anywhere: the merged tokenizer would be that file); the base may be a hub cache's links to its blobs."""
    for name in TOKENIZER_FILES:
        path = os.path.join(adapter_folder, name)
        if os.path.islink(path) or (os.path.lexists(path) and not os.path.isfile(path)):
            raise QLoRAPluginError(
                f"{path} is {'a symbolic link' if os.path.islink(path) else 'not a regular file'}; merge reads only "
                "regular files from the adapter folder. Replace it with a copy of the file it should be, or remove it."
            )
    own_tokenizer = any(os.path.isfile(os.path.join(adapter_folder, n)) for n in TOKENIZER_FILES[:2])
    source = adapter_folder if own_tokenizer else base_folder
    files = [(os.path.join(source, n), n) for n in TOKENIZER_FILES if os.path.isfile(os.path.join(source, n))]
    if os.path.isfile(os.path.join(base_folder, "generation_config.json")):
        files.append((os.path.join(base_folder, "generation_config.json"), "generation_config.json"))
    return files


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
    recorded = (settings or {}).get("layers_4bit", (settings or {}).get("layers_quantized"))
    if recorded is not None and recorded != len(layout.quantized):
        raise QLoRAPluginError(
            f"Training held {recorded} layers in {_backend(settings).label}, but transformers' quantizer here picks "
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
          max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE, check: bool = True, eval_data: str | None = None,
          trained_on: str | None = None) -> dict:
    """Merge the adapter in `adapter_dir` into its base and write the model to `out`. Returns a summary.

    Everything is checked before the first byte is written; the output appears at `out` only when complete and,
    with `check`, only when its fidelity check passed (`merge/fidelity.py`; `merge_report.json` beside it). A
    merge that fails the check is left at `<out>.incomplete` for inspection, and a `QLoRAPluginError` says why.
    `force` replaces only an earlier merge's output, never an input (`writer.check_output`).
    """
    check_output(out, force, (adapter_dir,))
    if check:
        fidelity.load_prompts(eval_data)  # a bad --eval_data fails before anything is written
    if dtype is not None and dtype not in MERGE_DTYPES:
        raise QLoRAPluginError(f"--dtype must be one of {', '.join(MERGE_DTYPES)}; got {dtype!r}.")
    if trained_on not in (None, "4bit", "16bit"):
        raise QLoRAPluginError(f"--trained_on must be 4bit or 16bit; got {trained_on!r}.")
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
    inputs = (adapter_dir, checkpoint.folder, *([adapter.base_name] if adapter.base_name and os.path.isdir(
        adapter.base_name) else []))  # the recorded base too, when --base points elsewhere
    check_output(out, force, inputs)
    side_files = _side_files(checkpoint.folder, adapter.folder)
    settings = quant_settings(adapter, quant_type, double_quant, trained_on)
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
    out_shapes = {n: s for n, s in shapes.items() if s and (n in written or n in extra)}
    params = sum(torch.Size(s).numel() for s in out_shapes.values())
    plan = fidelity.plan_memory(config, out_shapes, _adapter_params(adapter), eval_data) if check else None
    needed = params * torch.empty((), dtype=out_dtype).element_size()
    parent = os.path.dirname(os.path.abspath(out))
    if os.path.isdir(parent) and shutil.disk_usage(parent).free < needed:
        raise disk_error(OSError(errno.ENOSPC, "No space left on device"), out, needed)
    summary = {
        "out": out, "base": checkpoint.folder, "dtype": str(out_dtype).replace("torch.", ""),
        "adapted_layers": len(adapter.lora), "requantized_layers": len(layout.quantized & written),
        "quantization": _quantization_summary(settings),
        "untied": untie,
    }
    try:
        with staged_folder(out, force, inputs) as tmp:
            writer = ShardWriter(tmp, shard_bytes)
            _stream(checkpoint, layout, adapter, settings, extra,
                    lambda key, value: writer.add(key, value.to(out_dtype) if value.is_floating_point() else value))
            for name in heads:  # a reward model's classifier head: trained in full, only the adapter holds it
                writer.add(name, adapter.replacements[name].to(out_dtype))
            writer.finish()
            summary.update(bytes=writer.total_bytes, shards=len(writer.shards))
            _write_config(config, tmp, out_dtype, untie)
            for source, name in side_files:
                shutil.copyfile(source, os.path.join(tmp, name))
            write_json_atomic(os.path.join(tmp, MARKER_FILE), {
                "written_by": "qlora-plugin merge", "adapter": os.path.abspath(adapter_dir),
                **{k: v for k, v in summary.items() if k != "out"}})
            # The reference is what was trained: the recorded settings, not overrides given to this merge.
            trained = quant_settings(adapter, trained_on=trained_on) if read_record(adapter.folder) else settings
            summary["fidelity"] = _check(adapter, tmp, out, _reference_base(adapter, checkpoint.folder), trained,
                                         out_dtype, eval_data, force, plan) if check else None
    except OSError as err:
        raise disk_error(err, out, needed) from None
    return summary


def _reference_base(adapter: Adapter, base_folder: str) -> str:
    """The base the check rebuilds what was trained from: the one the adapter records when it is a local folder of
    the same model shape as --base (so a --base that is another model of that shape fails the check), else --base
    (the recorded folder moved, or is a Hub id: the check then shows only that the merge matches --base)."""
    recorded = adapter.base_name
    if not recorded or not os.path.isdir(recorded) or os.path.realpath(recorded) == os.path.realpath(base_folder):
        return base_folder
    try:
        same = [load_config(f).to_diff_dict() for f in (recorded, base_folder)]
    except QLoRAPluginError:
        return base_folder
    for config in same:
        config.pop("_name_or_path", None)
    return recorded if same[0] == same[1] else base_folder


def summary_line(summary: dict) -> str:
    """What `qlora-plugin merge` prints once the model is written (docs/merge.md shows it from a recorded run)."""
    q = summary["quantization"]
    kind = q and (q.get("bnb_4bit_quant_type") or "int8") + (" + double quant" if q.get("bnb_4bit_use_double_quant")
                                                               else "")
    into = (f"the dequantized {kind} base ({summary['requantized_layers']} layers re-quantized)" if q
            else "the 16-bit base")
    return (f"merged {summary['adapted_layers']} adapted layers into {into}; wrote {summary['bytes'] / 2**20:.1f} "
            f"MiB of {summary['dtype']} in {summary['shards']} shard(s) to {summary['out']}")


def _incomplete_place(out: str, force: bool) -> str:
    """Where a merge that failed its check goes: `<out>.incomplete`, replacing an earlier one only with --force
    (and only an earlier merge's); otherwise the first free `<out>.incomplete-N`."""
    place = os.path.abspath(out) + ".incomplete"
    if os.path.lexists(place) and force and os.path.isfile(os.path.join(place, MARKER_FILE)):
        shutil.rmtree(place)
    n = 1
    while os.path.lexists(place):
        n += 1
        place = f"{os.path.abspath(out)}.incomplete-{n}"
    return place


def _adapter_params(adapter: Adapter) -> int:
    tensors = [t for entry in adapter.lora.values() for t in (entry["A"], entry["B"], entry.get("magnitude"))]
    return sum(t.numel() for t in [*tensors, *adapter.replacements.values()] if t is not None)


def _check(adapter: Adapter, tmp: str, out: str, base_folder: str, settings, out_dtype, eval_data, force,
           plan) -> dict:
    """The fidelity check on the written folder, before it is put in place, as planned (`fidelity.plan_memory`:
    where, whole or block by block); a failure keeps it apart."""
    report = fidelity.check(adapter.folder, tmp, base_folder, settings, str(out_dtype).replace("torch.", ""),
                            eval_data, plan.blocks, plan.device)
    fidelity.write_report(tmp, report)
    if not report["passed"]:
        incomplete = _incomplete_place(out, force)
        os.replace(tmp, incomplete)
        raise QLoRAPluginError(
            f"The merged model failed its fidelity check ({'; '.join(report['failures'])}), so it was not written "
            f"to {out}. It is in {incomplete} with {fidelity.REPORT_FILE}. The reference was the adapter on "
            f"{base_folder}; check that --base is the model the adapter was trained on and that the recorded "
            "quantization matches; --no_check skips the check."
        )
    return report
