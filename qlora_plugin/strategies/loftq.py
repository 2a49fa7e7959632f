"""LoftQ-style LoRA initialisation (Li et al. 2023): start each adapter at the best rank-r correction of its layer's
4-bit quantization error, so training begins from the 16-bit model's function instead of the 4-bit one's.

When: `--init_lora_weights loftq` (or `auto` on a 4-bit base, `lora_init`), right after the adapter is added. For
every adapted 4-bit layer, the 16-bit weight W is read from the base's safetensors files (one tensor at a time,
never the whole model), the stored NF4/FP4 weight Q is dequantized, and the residual W - Q is factored by SVD:
`scaling * B @ A` becomes its best rank-r approximation.

Why our own and not peft's `replace_lora_weights_loftq` (peft 0.21, utils/loftq_utils.py): that one computes on
"cuda" or "xpu" only, and ignores the adapter's scaling (alpha / r = 0.25 in the paper's recipe), so only a quarter
of the correction reaches the output. Like peft's, this is the one-iteration form that leaves the 4-bit base exactly
as bitsandbytes stores it: the quantized-base cache, `plan`, `merge` (which merges into that same dequantized base)
and resume all stay valid. The multi-iteration form re-quantizes the base (Q = quant(W - BA)); that base would then
have to ship with the adapter, and it is not offered.

Deterministic: the randomized SVD runs under a fixed seed on a forked RNG, so every rank computes the same start
and the user's random state is untouched.
"""

from __future__ import annotations

import json
import math
import os

from qlora_plugin.ecosystem.compat import config_source
from qlora_plugin.core.errors import QLoRAPluginError

PEFT_PREFIX = "base_model.model."
OVERSAMPLE = 8  # extra random directions of the randomized SVD (`low_rank`)


class SafetensorsWeights:
    """Reads single tensors from a model folder's safetensors files (sharded or not), by parameter name."""

    def __init__(self, model_id: str, revision: str | None = None):
        self.folder = weights_folder(model_id, revision)
        index = os.path.join(self.folder, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                self.files = {name: os.path.join(self.folder, file) for name, file in json.load(f)["weight_map"].items()}
        else:
            from safetensors import safe_open

            single = os.path.join(self.folder, "model.safetensors")
            if not os.path.isfile(single):
                raise QLoRAPluginError(
                    f"`init_lora_weights loftq` reads the base's 16-bit weights from its safetensors files, and "
                    f"{self.folder} has none (model.safetensors or model.safetensors.index.json). Save the model "
                    "with `save_pretrained` (safetensors is the default), or use `--init_lora_weights default`."
                )
            with safe_open(single, framework="pt") as f:
                self.files = {name: single for name in f.keys()}

    def get(self, name: str, base_prefix: str | None):
        """The tensor for parameter `name`, trying the checkpoint's naming with and without the base prefix."""
        from safetensors import safe_open

        candidates = [name]
        if base_prefix:
            candidates += [name[len(base_prefix) + 1:]] if name.startswith(base_prefix + ".") else [f"{base_prefix}.{name}"]
        for key in candidates:
            if key in self.files:
                with safe_open(self.files[key], framework="pt") as f:
                    return f.get_tensor(key)
        raise QLoRAPluginError(
            f"`init_lora_weights loftq`: no tensor {name!r} in the safetensors files of {self.folder}, so the "
            "quantization error of that layer cannot be computed. Use `--init_lora_weights default` for this model."
        )


def base_weights(model) -> SafetensorsWeights:
    """The 16-bit weights of a PEFT model's base, from its safetensors files (raises, with the fix, if unreadable)."""
    config = model.get_base_model().config
    return SafetensorsWeights(*config_source(config))


def weights_folder(model_id: str, revision: str | None = None) -> str:
    """The local folder of a model: the path itself, or its snapshot in the Hugging Face cache (no download)."""
    if os.path.isdir(model_id):
        return model_id
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(model_id, revision=revision, local_files_only=True,
                                 allow_patterns=["*.safetensors", "*.safetensors.index.json"])
    except Exception as err:  # noqa: BLE001 - any failure means the same thing to the user
        raise QLoRAPluginError(
            f"`init_lora_weights loftq` needs the 16-bit weights of {model_id!r} on disk, and they are not in the "
            f"Hugging Face cache ({type(err).__name__}). Download them first (`hf download {model_id}`), or use "
            "`--init_lora_weights default`."
        ) from None


def low_rank(residual, rank: int):
    """U·sqrt(S), sqrt(S)·Vᵀ of the best rank-`rank` approximation of `residual` (fp32), and the squared norm of that
    approximation, which is what it cancels: B·A is the projection of `residual` onto its top singular directions
    (exactly, or onto the randomized SVD's estimate of them), so ‖R - B·A‖² = ‖R‖² - Σ s², with no product to form.
    Exact SVD for small matrices; above that a randomized SVD (Halko et al. 2011; `torch.svd_lowrank`, `rank + 8`
    directions) with 4 power iterations up to 1024 wide and 2 beyond: on SmolLM2-135M's layers it captures 97%
    (4 iterations) and 92% (2) of what the exact SVD does, and a 1.1B model's 154 layers take seconds instead of
    minutes on a CPU."""
    import torch

    rank = min(rank, *residual.shape)
    if min(residual.shape) <= 4 * (rank + OVERSAMPLE):
        u, s, vh = torch.linalg.svd(residual, full_matrices=False)
        u, s, v = u[:, :rank], s[:rank], vh[:rank].T
    else:
        with torch.random.fork_rng(devices=[residual.device] if residual.device.type == "cuda" else []):
            torch.manual_seed(0)
            u, s, v = torch.svd_lowrank(residual, q=rank + OVERSAMPLE,
                                        niter=4 if min(residual.shape) <= 1024 else 2)
        u, s, v = u[:, :rank], s[:rank], v[:, :rank]
    root = s.sqrt()
    return u * root, (v * root).T, float(s.square().sum())


def transient_bytes(out_features: int, in_features: int, calibrated: bool) -> int:
    """Peak device memory of the LoftQ start beyond the model, for one layer (they are done one at a time): the
    layer's 16-bit weight read as fp32 and its dequantized copy (the residual is formed in place), plus the input
    weighting's (in x in) fp32 Cholesky factor when calibrated. The SVD works on (in x (r + 8)) sketches, small
    beside these. The finished factors wait on the CPU, in the adapter's dtype."""
    return 4 * (2 * out_features * in_features + (in_features * in_features if calibrated else 0))


def loftq_initialise(model, adapter: str = "default", input_weights: dict | None = None,
                     progress: bool = False) -> dict:
    """Set every 4-bit LoRA layer's A and B so that `scaling * B @ A` is the best rank-r approximation of that
    layer's quantization error R. Returns facts for the summary: layers initialised, the share of the quantization
    error (squared norm, summed over layers) the adapters now cancel, and the seconds it took.

    With `input_weights` (layer name -> what its inputs look like, `calibration.InputWeights`), the error is
    measured as the layer's inputs see it, ||R·L||, and B @ A is the best rank-r approximation of R·L, mapped back by
    L⁻¹. L is the Cholesky factor of the inputs' second-moment matrix (EoRA, Liu et al. 2024, up to the choice of
    square root), or, where that matrix is too large to hold, the diagonal of per-channel root-mean-squares
    (activation-aware SVD, Yuan et al. 2023). A few input channels carry most of the signal, so an error there costs
    far more than the same error elsewhere; the plain form treats all alike.

    `progress`: a progress bar over the layers (the start takes seconds on a small model on an idle machine,
    minutes on a loaded one)."""
    import time

    from tqdm.auto import tqdm

    import bitsandbytes as bnb
    import torch
    from peft.tuners.lora import Linear4bit

    start = time.perf_counter()
    base_model = model.get_base_model()
    weights = base_weights(model)
    prefix = getattr(base_model, "base_model_prefix", None)
    starts, error, cancelled = [], 0.0, 0.0
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, Linear4bit) and adapter in m.lora_A]
    for name, module in tqdm(layers, desc="LoRA start (loftq)", unit="layer", disable=not progress):
        packed = module.get_base_layer().weight
        quantized = bnb.functional.dequantize_4bit(packed.data, packed.quant_state).float()
        residual = weights.get(name[len(PEFT_PREFIX):] + ".weight", prefix).to(quantized.device, torch.float32,
                                                                               copy=True)
        if residual.shape != quantized.shape and residual.T.shape == quantized.shape:
            residual = residual.T  # GPT-2's Conv1D stores (in, out); bitsandbytes quantized the transpose
        residual.sub_(quantized)  # in place: two fp32 copies of the layer at most (`transient_bytes`)
        del quantized
        weight = None if input_weights is None else input_weights[name].to(residual.device, torch.float32)
        if weight is not None:
            residual = residual @ weight if weight.dim() == 2 else residual * weight  # R·L: as the inputs see it
        b, a, captured = low_rank(residual, module.r[adapter])
        error += float(torch.linalg.vector_norm(residual)) ** 2  # no full-size temporary, unlike square().sum()
        cancelled += captured
        if weight is not None:
            a = torch.linalg.solve_triangular(weight, a, upper=False, left=False) if weight.dim() == 2 else a / weight
        scale = math.sqrt(module.scaling[adapter])
        dtype = module.lora_A[adapter].weight.dtype  # kept on the CPU in the adapter's dtype until every layer is
        starts.append((module, (a / scale).to("cpu", dtype), (b / scale).to("cpu", dtype)))  # done: no GPU build-up
        del residual, weight, a, b
    if not starts:
        raise QLoRAPluginError("`init_lora_weights loftq` found no 4-bit layer with a LoRA adapter to initialise.")
    for module, a, b in starts:  # only once every layer has its start: a failure above changes nothing
        for weight, value in ((module.lora_A[adapter].weight, a), (module.lora_B[adapter].weight, b)):
            # contiguous, like the parameter it replaces (the SVD's factors are transposed views): DDP's gradient
            # buckets and collectives assume the layout the parameter had when the engine wrapped it
            weight.data = value.to(weight.device, weight.dtype).contiguous()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the per-layer temporaries: back to the device before training allocates
    return {"layers": len(starts), "error_cancelled": cancelled / error if error else 0.0,
            "seconds": round(time.perf_counter() - start, 2)}
