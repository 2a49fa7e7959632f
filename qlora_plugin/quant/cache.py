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

The cache key is the SHA-256 of the source's files (config and safetensors; hashes are remembered per file by
path, size, mtime and inode so they are computed once) plus every setting that changes the stored bytes: quant
type, double quantization, storage and load dtypes, skipped modules, the bitsandbytes, torch and transformers
versions and the device kind. Entries are written to a temporary folder and renamed into place, so a reader
never sees half an entry. One process makes a missing entry while the others that need it wait on a lock file
beside it (per cache folder, so per node with local disks; no collective, so no process-group timeout however
long quantizing takes), then read it.
Location: `$QLORA_PLUGIN_CACHE_DIR`, else `$XDG_CACHE_HOME/qlora_plugin` (`~/.cache/qlora_plugin`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import weakref

from qlora_plugin.compat import model_from_config
from qlora_plugin.files import give_normal_permissions, write_json_atomic
from qlora_plugin.plugin.specs import hookimpl
from qlora_plugin.quant.layers import four_bit_layers, four_bit_module_names

logger = logging.getLogger(__name__)
_loaded_from: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> the cache entry it came from

CACHE_DIR_ENV = "QLORA_PLUGIN_CACHE_DIR"
FORMAT_VERSION = 1
ENTRY_FILE = "qlora_plugin_cache.json"
LOCKS = ".locks"  # lock files are kept (removing one while a process waits on it would let two makers in)
SOURCE_FILES = (".safetensors", "config.json", "model.safetensors.index.json")


def cache_root() -> str:
    explicit = os.environ.get(CACHE_DIR_ENV)
    if explicit:
        return os.path.abspath(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "qlora_plugin")


def _file_sha256(path: str, memo: dict) -> str:
    stat = os.stat(path)
    signature = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
    known = memo.get(path)
    if known and known["signature"] == signature:
        return known["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    memo[path] = {"signature": signature, "sha256": digest.hexdigest()}
    return memo[path]["sha256"]


def source_fingerprint(folder: str) -> dict[str, str]:
    """SHA-256 of each file that defines the weights; None when the folder has no safetensors weights."""
    names = sorted(n for n in os.listdir(folder) if n.endswith(SOURCE_FILES))
    if not any(n.endswith(".safetensors") for n in names):
        return None
    memo_path = os.path.join(cache_root(), "file-hashes.json")
    try:
        with open(memo_path, encoding="utf-8") as f:
            memo = json.load(f)
    except (OSError, ValueError):
        memo = {}
    fingerprint = {name: _file_sha256(os.path.realpath(os.path.join(folder, name)), memo) for name in names}
    try:
        write_json_atomic(memo_path, memo)
    except OSError:  # a read-only cache still works, it just hashes again next time
        pass
    return fingerprint


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


def _entry_name(folder: str, fingerprint: dict, settings: dict) -> str:
    key = hashlib.sha256(json.dumps([fingerprint, settings], sort_keys=True).encode()).hexdigest()[:20]
    return f"{os.path.basename(os.path.normpath(folder))}-{key}"


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


@contextlib.contextmanager
def _entry_lock(entry: str):
    """Held while one process makes `entry`; others wait here (a file lock, not a collective: no timeout).
    Without `fcntl` (Windows) nothing is locked: concurrent makers race, and the rename keeps one entry."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    locks = os.path.join(cache_root(), LOCKS)
    os.makedirs(locks, exist_ok=True)
    with open(os.path.join(locks, os.path.basename(entry) + ".lock"), "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cached_base(model_id: str, init_kwargs: dict, device: str = "cpu") -> str | None:
    """The folder of a 4-bit copy of `model_id` for these `from_pretrained` kwargs, creating it on a miss by
    quantizing on `device` ("cpu", "cuda:N"). Load it without `quantization_config`: its config.json carries the
    one it was made with.

    Returns None when the cache does not apply (no 4-bit config, not a local folder of safetensors, a checkpoint
    whose tensor names differ from its modules, an unwritable cache); the caller then loads as usual.
    """
    config = init_kwargs.get("quantization_config")
    if config is None or not getattr(config, "load_in_4bit", False) or not os.path.isdir(model_id):
        return None
    with open(os.path.join(model_id, "config.json"), encoding="utf-8") as f:
        if "auto_map" in json.load(f):  # custom modelling code: its files and loading are its own
            return None
    fingerprint = source_fingerprint(model_id)
    if fingerprint is None:
        return None
    dtype = init_kwargs.get("dtype")
    settings = _settings(config, dtype, device)
    entry = os.path.join(cache_root(), _entry_name(model_id, fingerprint, settings))
    if os.path.isfile(os.path.join(entry, ENTRY_FILE)):
        logger.info("Loading the 4-bit base from the cache: %s", entry)
        return entry
    try:
        os.makedirs(cache_root(), exist_ok=True)
        with _entry_lock(entry):
            if os.path.isfile(os.path.join(entry, ENTRY_FILE)):  # made by the process we waited for
                return entry
            return _make_entry(model_id, entry, config, dtype, device, fingerprint, settings,
                               bool(init_kwargs.get("trust_remote_code")))
    except OSError as err:
        logger.warning("Quantized-base cache unavailable (%s); quantizing at load time.", err)
        return None


def _make_entry(model_id, entry, config, dtype, device, fingerprint, settings, trust_remote_code) -> str | None:
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=cache_root())
    try:
        _quantize_into(model_id, tmp, config, dtype, trust_remote_code, device)
        with open(os.path.join(tmp, ENTRY_FILE), "w", encoding="utf-8") as f:
            json.dump({"source": os.path.abspath(model_id), "files": fingerprint, "settings": settings}, f, indent=2)
        give_normal_permissions(tmp)  # mkdtemp's 0700 and safetensors' 0600: a shared cache must be readable
        os.rename(tmp, entry)
    except LookupError as err:
        logger.info("Not caching %s (%s); quantizing at load time.", model_id, err)
        return None
    except OSError as err:
        if os.path.isfile(os.path.join(entry, ENTRY_FILE)):  # another process finished the same entry first
            return entry
        logger.warning("Could not write the quantized-base cache (%s); quantizing at load time.", err)
        return None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if device != "cpu":
            import torch

            torch.cuda.empty_cache()  # the GPU memory quantizing used goes back before the model loads
    return entry


def cached_entry(model) -> str | None:
    """The cache entry a (possibly PEFT-wrapped) model was loaded from; None if it was not loaded from the cache."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _loaded_from.get(base)


def quantized_on(model) -> str | None:
    """The device kind that quantized a (possibly PEFT-wrapped) model loaded from the cache; None otherwise.
    Entries made before the device was recorded were all quantized on the CPU."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    entry = _loaded_from.get(base)
    if entry is None:
        return None
    try:
        with open(os.path.join(entry, ENTRY_FILE), encoding="utf-8") as f:
            return json.load(f)["settings"].get("device", "cpu")
    except (OSError, ValueError, KeyError):
        return None


@hookimpl
def qlora_load_model(options, model_id, init_kwargs, runtime):
    """A local base loads from its cached 4-bit copy (made on a miss, on this process's GPU if it has one); None
    lets the next loader take it.

    Not under FSDP/ZeRO-3, which load through their own low-memory path. Under DDP the first rank to ask makes the
    entry while the others wait on its lock file, then all read it.
    """
    if not options.quantized_cache or runtime.shards_parameters:
        return None
    from trl.trainer.utils import create_model_from_path

    entry = cached_base(model_id, init_kwargs, quantizing_device(runtime))
    if entry is None:
        return None
    kwargs = {k: v for k, v in init_kwargs.items() if k != "quantization_config"}  # the entry's config.json has it
    model = create_model_from_path(entry, **kwargs)
    model.config._name_or_path = model.name_or_path = model_id  # what the adapter records as its base
    _loaded_from[model] = entry
    return model


@hookimpl
def qlora_run_facts(model):
    if not four_bit_layers(model):
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {"quantization": {"cached_base": _loaded_from.get(base)}}
