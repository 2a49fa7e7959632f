"""Quantize once: a cache of 4-bit bases, so later runs load packed NF4 weights instead of quantizing again.

Why: quantizing at load time costs minutes on big models and, through `from_pretrained`, holds far more than the
4-bit result (docs/architecture.md, Decisions). A cached base loads in seconds, memory-mapped.

How: the source checkpoint is streamed tensor by tensor; every linear layer transformers' bitsandbytes integration
would quantize is quantized with bitsandbytes' own `quantize_4bit`, and written in the serialization transformers
reads back for pre-quantized bitsandbytes checkpoints (`QuantState.as_dict(packed=True)`). Never more than one
16-bit tensor is held at a time. The result is bit-identical to quantizing at load time (tested).

Where: on the process's GPU when it trains on one (bitsandbytes' CUDA kernel: seconds per billion parameters,
against minutes for its generic torch path on the CPU), else on the CPU. The two paths are different code
(bitsandbytes/backends/cuda/ops.py `quantize_4bit`, a CUDA kernel, and backends/default/ops.py, torch ops), so
their bytes are not assumed equal: the device kind is part of the key, and the entry records it for `merge`.

Which bases: a local folder, or a Hub id whose snapshot is in the Hugging Face cache, with `from_pretrained`'s
`subfolder` and `revision` (`cache_source`). The cache key is the base's identity, read without its weights
(`cache_source.source_identity`: file sizes, modification and change times, inodes, safetensors headers, the
snapshot's commit), plus every setting that changes the stored bytes: quant type, double quantization, storage and
load dtypes, skipped modules, the bitsandbytes, torch and transformers versions and the device kind. Entries are
written to a staging folder and renamed into place, so a reader never sees half an entry; each records its files'
sizes and digests and is checked before use (`cache_contents`): a damaged entry is rebuilt with a notice naming it.
One process makes a missing entry while the others that need it wait on a lock file beside it (per cache folder,
so per node with local disks; no collective, so no process-group timeout however long quantizing takes; waiting
says who holds it, and a dead holder's lock is taken over: `cache_lock`), then read it. Staging folders left by
killed makers are removed by the next run.
Location: `$QLORA_PLUGIN_CACHE_DIR`, else `$XDG_CACHE_HOME/qlora_plugin` (`~/.cache/qlora_plugin`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil

from qlora_plugin.ecosystem.compat import model_from_config
from qlora_plugin.core.files import give_normal_permissions, write_json_atomic
from qlora_plugin.plugin.specs import hookimpl
from qlora_plugin.quant.backends import backend_of_config
from qlora_plugin.quant.cache_origin import ENTRY_FILE, _loaded_from, cached_entry, quantized_on  # noqa: F401
from qlora_plugin.quant.cache_contents import contents_problem, read_record, record_contents
from qlora_plugin.quant.cache_lock import OWNER_FILE, entry_lock, make_staging, remove_stale_staging
from qlora_plugin.quant.cache_source import local_source, source_identity
from qlora_plugin.quant.layers import four_bit_layers, four_bit_module_names

logger = logging.getLogger(__name__)
CACHE_DIR_ENV = "QLORA_PLUGIN_CACHE_DIR"
FORMAT_VERSION = 2  # 2: keyed on the source's identity (not its bytes' digest); entries record their contents
LOCKS = ".locks"  # lock files are kept (removing one while a process waits on it would let two makers in)
MISSING = "missing"
ENTRY_HAS = ("quantization_config", "subfolder", "revision", "cache_dir")  # kwargs the entry folder answers itself


def cache_root() -> str:
    explicit = os.environ.get(CACHE_DIR_ENV)
    if explicit:
        return os.path.abspath(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "qlora_plugin")


def _settings(quantization_config, dtype, device: str) -> dict:
    import bitsandbytes
    import torch
    import transformers

    return {
        "format": FORMAT_VERSION,
        "quant_type": quantization_config.bnb_4bit_quant_type,
        "double_quant": quantization_config.bnb_4bit_use_double_quant,
        "quant_storage": str(quantization_config.bnb_4bit_quant_storage).replace("torch.", ""),
        "compute_dtype": str(quantization_config.bnb_4bit_compute_dtype).replace("torch.", ""),
        "skip_modules": quantization_config.llm_int8_skip_modules,
        "dtype": str(dtype).replace("torch.", ""),
        "bitsandbytes": bitsandbytes.__version__.split("+")[0],
        "transformers": transformers.__version__.split("+")[0],
        "torch": torch.__version__.split("+")[0],
        "device": _device_kind(device),  # the kernel that quantizes (cpu or cuda), not which GPU
    }


def _device_kind(device: str) -> str:
    return str(device).split(":")[0]


def quantizing_device(runtime) -> str:
    """Where this process quantizes: its own GPU when it trains on CUDA (the one accelerate gave it), else the CPU."""
    return runtime.device if runtime.device_type == "cuda" else "cpu"


def _entry_name(label: str, identity: dict, settings: dict) -> str:
    key = hashlib.sha256(json.dumps([identity, settings], sort_keys=True).encode()).hexdigest()[:20]
    return f"{label}-{key}"


def _label(model_id: str, subfolder: str | None) -> str:
    """The readable start of an entry's name: the model's last path part (and the subfolder's)."""
    label = os.path.basename(os.path.normpath(model_id))
    return f"{label}-{subfolder.strip('/').replace('/', '-')}" if subfolder else label


def _quantized_layout(folder: str, quantization_config, dtype, trust_remote_code: bool):
    """Names of the linear weights transformers would quantize, and which of them are GPT-2 `Conv1D` (stored
    transposed), from a skeleton on the meta device and transformers' own rule (`four_bit_module_names`)."""
    import transformers
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    # The class TRL's `create_model_from_path` will load, so the skeleton has the same modules.
    architecture = getattr(transformers, (config.architectures or [""])[0], None)
    with init_empty_weights():
        skeleton = None if architecture is None else model_from_config(architecture, config, dtype)
        if skeleton is None:
            skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    names = set(skeleton.state_dict())
    conv1d = {name for name, module in skeleton.named_modules() if isinstance(module, Conv1D)}
    layers = four_bit_module_names(skeleton, quantization_config.llm_int8_skip_modules)
    return config, names, {f"{n}.weight" for n in layers}, {f"{n}.weight" for n in conv1d}


def _quantize_into(folder: str, tmp: str, quantization_config, dtype, trust_remote_code: bool, device: str) -> None:
    import bitsandbytes.functional as bnbf
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers.utils import logging as hf_logging

    config, names, quantized, transposed = _quantized_layout(folder, quantization_config, dtype, trust_remote_code)
    shards = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    weight_map, missing = {}, set(quantized)
    progress = hf_logging.tqdm(total=len(shards), desc="Quantizing the base once (cached for later runs)",
                               unit="shard", disable=not hf_logging.is_progress_bar_enabled())
    for shard in shards:
        tensors = {}
        with safe_open(os.path.join(folder, shard), framework="pt") as f:
            for key in f.keys():
                if key not in names:  # renamed or fused on load: only transformers' loader knows the mapping
                    raise LookupError(f"checkpoint tensor {key!r} is not a parameter name of the model")
                tensor = f.get_tensor(key)
                if key not in quantized:
                    tensors[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
                    continue
                missing.discard(key)
                if key in transposed:
                    tensor = tensor.t()
                packed, state = bnbf.quantize_4bit(
                    tensor.to(device=device, dtype=dtype).contiguous(), blocksize=64,
                    compress_statistics=quantization_config.bnb_4bit_use_double_quant,
                    quant_type=quantization_config.bnb_4bit_quant_type,
                    quant_storage=quantization_config.bnb_4bit_quant_storage,
                )
                tensors[key] = packed.cpu()
                tensors.update({f"{key}.{name}": value.cpu() for name, value in state.as_dict(packed=True).items()})
                del tensor, packed, state
        save_file(tensors, os.path.join(tmp, shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
        del tensors
        progress.update(1)
    progress.close()
    if missing:  # checkpoint names differ from module names (renamed or fused on load): not streamable
        raise LookupError(f"{len(missing)} quantizable weights not found under their module names")
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    config.quantization_config = quantization_config
    config.dtype = dtype
    config.save_pretrained(tmp)


def _entry_problem(entry: str) -> str | None:
    """None when `entry` is complete and as written; `MISSING` when absent; else what is wrong with it."""
    if not os.path.lexists(entry):
        return MISSING
    record_path = os.path.join(entry, ENTRY_FILE)
    if not os.path.isfile(record_path) or os.path.islink(record_path):
        return f"its record {ENTRY_FILE} is missing"
    record = read_record(record_path)
    if record is None:
        return f"its record {ENTRY_FILE} is unreadable"
    restamped = {}
    problem = contents_problem(entry, record.get("contents"), restamped)
    if problem is None and restamped:  # same bytes, new stamps (a touch, a chmod, a restore): check once, not again
        for name, stamp in restamped.items():
            record["contents"][name].update(stamp)
        try:
            write_json_atomic(record_path, record)
        except OSError:  # a read-only cache: checked again next time
            pass
    return problem


def cached_base(model_id: str, init_kwargs: dict, device: str = "cpu") -> str | None:
    """The folder of a 4-bit copy of `model_id` for these `from_pretrained` kwargs, creating it on a miss (and
    rebuilding a damaged one) by quantizing on `device` ("cpu", "cuda:N"). Load it without `quantization_config`
    or `subfolder`: its config.json carries the config it was made with.

    Returns None when the cache does not apply (no 4-bit config, weights not on this machine, no safetensors, custom
    modelling code, a checkpoint whose tensor names differ from its modules, an unwritable cache); the caller then
    loads as usual.
    """
    config = init_kwargs.get("quantization_config")
    backend = backend_of_config(config)
    if backend is None or not backend.cacheable:  # a 16-bit load, or a backend the cache cannot store (int8)
        return None
    source = local_source(model_id, init_kwargs)
    if source is None:
        return None
    folder, commit = source
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            if "auto_map" in json.load(f):  # custom modelling code: its files and loading are its own
                return None
        identity = source_identity(folder, commit)
    except (OSError, ValueError, AttributeError, TypeError):  # the model's own problem: its loading says so
        return None
    if identity is None:
        return None
    dtype = init_kwargs.get("dtype")
    settings = _settings(config, dtype, device)
    root = cache_root()
    name = _entry_name(_label(model_id, init_kwargs.get("subfolder")), identity, settings)
    entry = os.path.join(root, name)
    if _entry_problem(entry) is None:
        logger.info("Loading the 4-bit base from the cache: %s", entry)
        return entry
    try:
        os.makedirs(root, exist_ok=True)
        remove_stale_staging(root)
        with entry_lock(os.path.join(root, LOCKS, name + ".lock"), f"the cached 4-bit base {entry}"):
            problem = _entry_problem(entry)
            if problem is None:  # made (or repaired) by the process we waited for
                return entry
            remove_stale_staging(root, name)  # its maker held this lock: it is gone
            if problem != MISSING:
                logger.warning("The quantized-base cache entry %s is damaged (%s); rebuilding it from %s. (The "
                               "cache is at %s: $%s.)", entry, problem, model_id, root, CACHE_DIR_ENV)
                _discard(root, name, entry)
            return _make_entry(folder, entry, config, dtype, device, identity, settings,
                               bool(init_kwargs.get("trust_remote_code")))
    except OSError as err:
        logger.warning("Quantized-base cache %s unavailable (%s); quantizing at load time.", root, err)
        return None


def _discard(root: str, name: str, entry: str) -> None:
    """Move a damaged entry into a staging folder (gone at once; a killed run's leftover is cleaned next time)."""
    trash = make_staging(root, name)
    os.rename(entry, os.path.join(trash, "damaged"))
    shutil.rmtree(trash, ignore_errors=True)


def _make_entry(folder, entry, config, dtype, device, identity, settings, trust_remote_code) -> str | None:
    root = os.path.dirname(entry)
    tmp = make_staging(root, os.path.basename(entry))
    try:
        _quantize_into(folder, tmp, config, dtype, trust_remote_code, device)
        give_normal_permissions(tmp)  # mkdtemp's 0700 and safetensors' 0600: a shared cache must be readable
        contents = record_contents(tmp, leave_out=(OWNER_FILE, ENTRY_FILE))  # after the chmod: it moves ctime
        with open(os.path.join(tmp, ENTRY_FILE), "w", encoding="utf-8") as f:
            json.dump({"source": os.path.abspath(folder), "files": identity, "settings": settings,
                       "contents": contents}, f, indent=2)
        os.rename(tmp, entry)
    except LookupError as err:
        logger.info("Not caching %s (%s); quantizing at load time.", folder, err)
        return None
    except OSError as err:
        if _entry_problem(entry) is None:  # another process finished the same entry first
            return entry
        logger.warning("Could not write the quantized-base cache entry %s (%s); quantizing at load time.", entry, err)
        return None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if device != "cpu":
            import torch

            torch.cuda.empty_cache()  # the GPU memory quantizing used goes back before the model loads
    return entry


def recorded_base(model_id: str, init_kwargs: dict) -> str:
    """The name a model loaded with `from_pretrained(model_id, subfolder=...)` records as its base (what the
    adapter names, what LoftQ reads the 16-bit weights from): the folder holding its weights, which loads by itself;
    without a subfolder, `model_id` as given."""
    if not init_kwargs.get("subfolder"):
        return model_id
    source = local_source(model_id, init_kwargs)
    return source[0] if source else model_id

@hookimpl
def qlora_load_model(options, model_id, init_kwargs, runtime):
    """A base on this machine (a folder, or a Hub id's snapshot in the Hugging Face cache) loads from its cached
    4-bit copy (made on a miss, on this process's GPU if it has one); None lets the next loader take it.

    Not under FSDP/ZeRO-3, which load through their own low-memory path. Under DDP the first rank to ask makes the
    entry while the others wait on its lock file, then all read it. An entry that fails to load although it checked
    out is left to the usual loader (the failure then is the model's or the kwargs', said as such).
    """
    if not options.quantized_cache or runtime.shards_parameters:
        return None
    import torch
    from trl.trainer.utils import create_model_from_path

    entry = cached_base(model_id, init_kwargs, quantizing_device(runtime))
    if entry is None:
        return None
    # The entry is one flat local folder whose config.json carries the quantization config.
    kwargs = {k: v for k, v in init_kwargs.items() if k not in ENTRY_HAS}
    try:
        model = create_model_from_path(entry, **kwargs)
    except (torch.OutOfMemoryError, MemoryError, KeyboardInterrupt):
        raise
    except Exception as err:  # noqa: BLE001 - whatever it is, loading without the cache says it in the model's terms
        logger.warning("Could not load the cached 4-bit base %s (%s: %s); loading %s without the cache.", entry,
                       type(err).__name__, err, model_id)
        return None
    model.config._name_or_path = model.name_or_path = recorded_base(model_id, init_kwargs)  # what adapters record
    record = read_record(os.path.join(entry, ENTRY_FILE)) or {}
    commit = (record.get("files") or {}).get("commit")
    if commit:
        model.config._commit_hash = commit  # the snapshot LoftQ reads the 16-bit weights from
    _loaded_from[model] = entry
    return model


@hookimpl
def qlora_run_facts(model):
    if not four_bit_layers(model):
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {"quantization": {"cached_base": _loaded_from.get(base)}}
