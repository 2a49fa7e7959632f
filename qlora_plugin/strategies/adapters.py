"""After load: k-bit training preparation and the LoRA adapter (peft), on every linear layer of the blocks."""

from __future__ import annotations

import contextlib
import logging

from transformers import TrainerCallback

from qlora_plugin.core.errors import QLoRAPluginError
from qlora_plugin.ecosystem.notices import library_deprecations
from qlora_plugin.core.options import StrategyOptions
from qlora_plugin.quant.backends import backend_for
from qlora_plugin.ecosystem.runtime import Runtime

logger = logging.getLogger(__name__)

BIG_MODEL_PARAMS = 20e9  # the paper's recipe changes above this size (dropout 0.05, lr 1e-4)


def linear_layer_names(model) -> list[str]:
    """Short names (`q_proj`, `c_attn`, ...) of the linear layers LoRA can adapt, as `--lora_target_modules`
    takes them; includes 4-bit and GPT-2 `Conv1D` layers."""
    import torch
    from transformers.pytorch_utils import Conv1D

    names = []
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            short = name.rsplit(".", 1)[-1]
            if short not in names:
                names.append(short)
    return names


def check_target_modules(model, targets: list[str]) -> None:
    """Every name in `--lora_target_modules` must match a layer; say which did not and what exists."""
    if "all-linear" in targets:
        return
    module_names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in module_names)]
    if missing:
        raise QLoRAPluginError(
            f"`lora_target_modules` {missing} match no layer of this model. Its linear layers are: "
            f"{', '.join(linear_layer_names(model))}. Use some of those, or `all-linear`."
        )


def count_parameters(model) -> int:
    """Parameters of the model as trained in 16-bit (4-bit layers count their full, unpacked size)."""
    total = 0
    for param in model.parameters():
        shape = getattr(getattr(param, "quant_state", None), "shape", None)
        total += shape.numel() if shape is not None else param.numel()
    return total


def lora_dropout(options: StrategyOptions, num_params: int) -> float:
    if options.lora_dropout is not None:
        return float(options.lora_dropout)
    return 0.05 if num_params > BIG_MODEL_PARAMS else 0.1


@contextlib.contextmanager
def embeddings_kept(model):
    """While the body upcasts the model (peft's k-bit preparation, `plan`'s skeleton), the input embeddings and the
    output head keep their weights as loaded: 16-bit in the compute dtype, as in the paper's code (which casts
    `embed_tokens` and `lm_head` back to bf16 after `prepare_model_for_kbit_training`; norms stay fp32).

    Why: `prepare_model_for_kbit_training` casts every 16-bit parameter that is not 4-bit to fp32 (peft 0.21,
    peft/utils/other.py:204-209), with no option to leave some out. For the embeddings and the head that doubles
    their memory for the whole run: about 2 GB on a 128k-vocabulary 8B model. Their data is set aside while the
    body runs (it sees an empty tensor of the same dtype), so no fp32 copy is ever made.

    The fp32 norms make the hidden states reaching the head fp32; autocast casts them for the head's matmul, and
    outside it (`generate()`, evaluation by hand, a run with mixed precision off) the head does the same
    (`_input_in_weight_dtype`), as bitsandbytes' 4-bit layers do with their input."""
    import torch

    kept, seen = [], set()
    head = model.get_output_embeddings()
    for module in (model.get_input_embeddings(), head):
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.nn.Parameter) and id(weight) not in seen and weight.dtype in (torch.bfloat16, torch.float16):
            seen.add(id(weight))
            kept.append((weight, weight.data))
            weight.data = torch.empty(0, dtype=weight.dtype, device=weight.device)
    try:
        yield
    finally:
        for weight, data in kept:
            weight.data = data
    if head is not None and any(weight is getattr(head, "weight", None) for weight, _ in kept):
        head.register_forward_pre_hook(_input_in_weight_dtype)


def _input_in_weight_dtype(module, args):
    """Forward pre-hook: the input in the module's weight dtype (what autocast does for its matmul)."""
    hidden, *rest = args
    if hidden.is_floating_point() and hidden.dtype != module.weight.dtype:
        return (hidden.to(module.weight.dtype), *rest)
    return None


LOFTQ_INITS = ("loftq", "loftq_calibrated")


def lora_init(options: StrategyOptions, four_bit: bool, shards_parameters: bool, deepspeed: bool = False,
              base: str = "16-bit") -> str:
    """The adapter initialisation this run uses: `init_lora_weights`, with `auto` resolved. auto is
    loftq_calibrated on a 4-bit base, where it measurably closes most of the 4-bit quality gap (docs/benchmarks.md),
    except where no LoftQ start can run: with DoRA (its magnitude is computed from the weight before the adapter
    starts) and under FSDP/ZeRO-3 (each rank holds only a shard of each weight). Under DeepSpeed ZeRO-1/2 the
    calibrated start cannot run either: it is computed when training starts, after `deepspeed.initialize` has
    copied the LoRA weights into the engine's flat fp32 masters, so writing the adapter then would be lost; auto
    takes plain loftq there (computed when the adapter is added, before the engine exists). An explicit start
    that cannot run is refused, never silently replaced. `four_bit`: the base's backend has LoftQ starts
    (`QuantBackend.loftq`); `base` says what the base is otherwise (an 8-bit base has no LoftQ: peft's corrects
    4-bit error only)."""
    choice = options.init_lora_weights
    blocker = ("the base is 16-bit, so there is no quantization error to correct" if not four_bit and base == "16-bit"
               else f"the base is {base}, and peft's LoftQ corrects 4-bit quantization error only" if not four_bit else
               "DoRA computes its magnitude from the weight before the adapter is set" if options.use_dora else
               "under FSDP / DeepSpeed ZeRO-3 each process holds only a shard of each weight"
               if shards_parameters else None)
    if choice in LOFTQ_INITS and blocker:
        raise QLoRAPluginError(f"`init_lora_weights {choice}` cannot run here: {blocker}. Use `--init_lora_weights "
                               "default` (or leave it at auto).")
    if choice == "loftq_calibrated" and deepspeed:
        raise QLoRAPluginError("`init_lora_weights loftq_calibrated` cannot run under DeepSpeed: it is computed when "
                               "training starts, after the DeepSpeed engine has copied the LoRA weights into its own "
                               "fp32 master weights, so the start would be lost. Use `--init_lora_weights loftq` "
                               "(computed before the engine starts; what auto picks here) or `default`.")
    if choice == "auto":
        return "default" if blocker else "loftq" if deepspeed else "loftq_calibrated"
    return choice


def wrap_with_lora(model, options: StrategyOptions, runtime: Runtime):
    """Prepare a k-bit model for training (not under FSDP/ZeRO-3, which must not upcast), add LoRA, and start it as
    `init_lora_weights` says (`lora_init`). On `plan`'s meta-device skeleton nothing is initialised. loftq is
    computed here; loftq_calibrated needs the training data, so here it only checks that the 16-bit weights can be
    read, and `calibration.CalibratedLoftQ` computes it when training starts."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    check_target_modules(model, options.lora_target_modules)
    num_params = count_parameters(model)
    quantized = bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))
    backend = backend_for(options)
    init = lora_init(options, bool(backend and backend.loftq), runtime.shards_parameters,  # also on `plan`'s skeleton
                     deepspeed=runtime.engine == "deepspeed", base=backend.label if backend else "16-bit")
    if quantized and not runtime.shards_parameters:
        # Upcasts norms to fp32 for stable training (embeddings and head kept 16-bit); gradient checkpointing is
        # left to the Trainer.
        with embeddings_kept(model):
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    with library_deprecations():  # peft reads transformers' deprecated `is_gradient_checkpointing`
        model = get_peft_model(model, lora_config(options, num_params, init_lora_weights=PEFT_INIT.get(init, init)))
    facts = {"method": init}
    if backend is not None and not backend.loftq and options.init_lora_weights == "auto":
        facts["note"] = f"auto: no LoftQ start for this {backend.label} base (peft's LoftQ corrects 4-bit error only)"
    if init in LOFTQ_INITS and not any(p.is_meta for p in model.parameters()):
        from qlora_plugin.strategies.calibration import CALIBRATION_EXAMPLES
        from qlora_plugin.strategies.loftq import base_weights, loftq_initialise

        try:
            if init == "loftq":
                facts.update(loftq_initialise(model))
            else:
                base_weights(model)  # readable: fail now, not when training starts
                facts.update(pending=True, examples=CALIBRATION_EXAMPLES)
        except QLoRAPluginError as err:
            if options.init_lora_weights != "auto":
                raise
            # auto was our choice, not the user's: the run goes on from peft's start, and says why
            logger.warning("init_lora_weights auto: starting from peft's default instead of loftq. %s", err)
            facts = {"method": "default", "note": f"loftq not possible: {err}"}
    model.qlora_lora_init = facts  # read by `adapter_facts`
    return model


PEFT_INIT = {"default": True, "loftq": True, "loftq_calibrated": True}  # LoftQ: peft's start, then replaced


def lora_config(options: StrategyOptions, num_params: int, **extra):
    """The strategy's `LoraConfig` (also what `plan` puts on its meta-device skeleton)."""
    from peft import LoraConfig

    targets = options.lora_target_modules
    return LoraConfig(
        r=options.lora_r,
        lora_alpha=options.lora_alpha,
        lora_dropout=lora_dropout(options, num_params),
        target_modules=targets[0] if targets == ["all-linear"] else list(targets),
        modules_to_save=options.lora_modules_to_save,
        use_dora=options.use_dora,
        use_rslora=options.use_rslora,
        task_type=options.lora_task_type,
        bias="none",
        **extra,
    )


def trainable_dtype(compute_dtype: str, fp16_amp: bool, shards_parameters: bool = False) -> str:
    """The dtype the adapter (every trainable parameter) is kept in: the compute dtype, except with fp16 (mixed
    precision, or fp16 compute), where it is fp32 as in the paper's code. fp16 AMP scales the loss with a
    `GradScaler`, whose `unscale_` refuses fp16 gradients ("Attempting to unscale FP16 gradients",
    torch/amp/grad_scaler.py), and fp16 weights would lose the small updates; autocast still runs the adapter's
    matmuls in fp16.

    Not under FSDP / ZeRO-3 (`shards_parameters`): they flatten the adapter with the 16-bit base, which needs one
    dtype, and bring their own scaling (FSDP's `ShardedGradScaler` accepts fp16 gradients)."""
    fp16 = fp16_amp or compute_dtype == "float16"
    return "float32" if fp16 and not shards_parameters else compute_dtype


def cast_trainable(model, dtype_name: str) -> None:
    """Keep the adapter in `dtype_name` (`trainable_dtype`). TRL casts a quantized model's trainable parameters to
    bf16 even where the 4-bit matmuls run in fp32 (CPUs without native bf16, where bf16 matmuls are many times
    slower) or in fp16 (GPUs without bf16)."""
    import torch

    dtype = getattr(torch, dtype_name)
    for name, param in model.named_parameters():
        if param.requires_grad and param.dtype != dtype and "lora_magnitude_vector" not in name:
            param.data = param.data.to(dtype)


class KeepAdapterDtype(TrainerCallback):
    """The trainable parameters back in `dtype_name` (`cast_trainable`) after the two places that change them: TRL's
    casts when the trainer is built (`on_init_end`), and peft's upcast to fp32 when `train()` loads a checkpoint's
    adapter to resume (`on_train_begin`); a resumed run then continues in the dtype it started in."""

    def __init__(self, dtype_name: str | None):
        self.dtype_name = dtype_name

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is not None and self.dtype_name:
            cast_trainable(model, self.dtype_name)

    on_train_begin = on_init_end


def adapter_facts(model, compute_dtype: str | None, fp16_amp: bool = False, shards_parameters: bool = False) -> dict:
    """The adapter as the summary and report describe it (rank, targets, trainable parameters, the dtype it is
    kept in: `trainable_dtype`)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    config = model.peft_config[model.active_adapter] if hasattr(model, "peft_config") else None
    targets = sorted({name.rsplit(".", 1)[-1] for name in (config.target_modules or [])}) if config else []
    return {
        "r": getattr(config, "r", None),
        "alpha": getattr(config, "lora_alpha", None),
        "dropout": getattr(config, "lora_dropout", None),
        "use_dora": getattr(config, "use_dora", False),
        "dtype": trainable_dtype(compute_dtype or str(model.dtype).replace("torch.", ""), fp16_amp, shards_parameters),
        "target_modules": targets,
        "layers": sum(1 for name, _ in model.named_modules() if name.endswith(".lora_A")),
        "init": getattr(model, "qlora_lora_init", {"method": "default"}),
        "trainable_params": trainable,
        "total_params": count_parameters(model),
    }
