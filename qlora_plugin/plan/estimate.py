"""`qlora-plugin plan`: predict peak training memory from `config.json` alone, before anything is downloaded.

The model is built as a skeleton on the meta device (no weights, no memory) and turned into what each strategy
really trains, using the same code paths and defaults as the strategies:

- which linear layers become 4-bit: transformers' own bitsandbytes rules (`get_modules_to_not_convert`,
  `should_convert_module`: every `nn.Linear`/`Conv1D` except the output head, tied and kept-in-fp32 modules);
- 4-bit bytes per layer: packed codes + absmax per 64-block (fp32, or uint8 + an fp32 constant per 256 blocks +
  the code maps with double quantization), exactly what bitsandbytes allocates (see docs/plan.md);
- the rest of a qlora base in fp32 (`prepare_model_for_kbit_training` upcasts it) but the embeddings and head,
  kept in the compute dtype (`adapters.embeddings_kept`); lora/full in the compute dtype;
- the adapter: peft's own `get_peft_model` on the skeleton with the strategy's `StrategyOptions`, in the dtype
  `adapters.trainable_dtype` keeps it in (the compute dtype; fp32 with fp16 compute);
- optimizer and gradient checkpointing from `recipe.training_defaults`, lr/dropout by size from `adapters`;
- activations: counted, not guessed (`plan_activations`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

from qlora_plugin.core.errors import QLoRAPluginError
from qlora_plugin.models.model_config import load_config
from qlora_plugin.core.options import StrategyOptions, build_options
from qlora_plugin.plan.activations import activation_bytes, eval_transient
from qlora_plugin.plan.allocator import ALLOCATOR_SHARE, MALLOC_MODES, how, kept_of, mode_of, on_heap
from qlora_plugin.plan.step_cost import StepCost
from qlora_plugin.plan.loss import buffer_mapped
from qlora_plugin.plan.skeleton import QuantizedLinearStandIn, skeleton
from qlora_plugin.plan.start import start_transient_bytes
from qlora_plugin.plugin.manager import collect_options, collect_strategies, get_plugin_manager
from qlora_plugin.quant.backends import backend_for
from qlora_plugin.quant.backends.bnb_4bit import four_bit_bytes  # noqa: F401 - where plan's callers find it
from qlora_plugin.ecosystem.runtime import Runtime, cpu_has_native_bf16
from qlora_plugin.strategies.adapters import count_parameters, trainable_dtype
from qlora_plugin.strategies.builtin import QLORA
from qlora_plugin.strategies.optimizer import optim_name
from qlora_plugin.strategies.recipe import training_defaults
from qlora_plugin.core.strategy import unknown_strategy_error

FULL = "full"  # 16-bit full fine-tuning: a plan-only comparison, not a strategy
COMPONENTS = ("weights", "adapters", "gradients", "optimizer", "activations", "loss", "reference", "generation",
              "allocator", "start", "runtime")  # reference, generation: other trainers' passes (`trainer_passes`)
DEVICES = ("cuda", "cpu")
# what exists only while training steps run: freed (gradients: `zero_grad(set_to_none=True)`) or replaced by the
# evaluation forward's own transient (`eval_activations`) while evaluating
TRAINING_ONLY = ("gradients", "activations", "loss", "allocator", "start", "reference", "generation")
# Process RSS of python + torch + transformers + trl + peft + bitsandbytes + datasets imported and a trainer's
# data pipeline running, on the CPU development machine: a 1-layer, 64-wide model trained at 1 x 16 tokens peaks
# at 511-543 MiB with under 2 MiB of model terms (`examples/bench/plan_accuracy.py` prints it; docs/plan.md). The CUDA
# context is not in `torch.cuda.max_memory_allocated`, so the cuda plan has no runtime term.
CPU_RUNTIME_BYTES = 520 * 2**20
# The CUDA context (driver, kernels, cuBLAS workspace): outside the allocator's figures, but on the GPU. An
# estimate, not yet measured by this project (CUDA 12 with lazy module loading typically takes 300-600 MiB);
# examples/bench/gpu_smoke.py measures it (free memory before and after CUDA starts).
CUDA_CONTEXT_BYTES = 500 * 2**20

# bitsandbytes pages an optimizer's state only for parameters of at least this many elements
# (bitsandbytes/optim/optimizer.py `get_state_buffer`); smaller ones stay in ordinary device memory.
BNB_PAGED_MIN_NUMEL = 100_000

# Optimizer state in bytes per trainable element: "fp32" (two fp32 moments), "param" (two moments in the
# parameter's dtype, as torch's AdamW allocates them), "8bit" (bitsandbytes blockwise: two uint8 moments + an
# fp32 absmax per 256 elements, fp32 below 4096 elements), "factored" (Adafactor row+column statistics), none.
OPTIMIZERS = {
    "paged_adamw_32bit": "fp32", "paged_adamw": "fp32", "adamw_torch": "param", "adamw_torch_fused": "param",
    "adamw_8bit": "8bit", "adamw_bnb_8bit": "8bit", "paged_adamw_8bit": "8bit", "adafactor": "factored",
    "sgd": "none",
}
BNB_MIN_8BIT_SIZE = 4096


@dataclass
class PlanSettings:
    """What the training run will look like. None means: what the strategy would choose."""

    batch_size: int = 1
    seq_len: int = 512
    eval_batch_size: int | None = None  # per-device evaluation batch; None: the training batch
    device: str = "cuda"
    dtype: str = "auto"  # compute dtype of the run (`--dtype`); auto: bf16 on cuda, fp32 on a CPU without bf16
    optim: str | None = None
    gradient_checkpointing: bool | None = None
    trust_remote_code: bool = False
    malloc: str = "tuned"  # CPU: glibc tuned by `qlora-plugin run` (the documented way to train on CPU), or its defaults

    def __post_init__(self):
        if self.eval_batch_size is None:
            self.eval_batch_size = self.batch_size
        for name in ("batch_size", "seq_len", "eval_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise QLoRAPluginError(f"`{name}` must be a positive integer; got {value!r}.")
        if self.device not in DEVICES:
            raise QLoRAPluginError(f"`--device` must be one of {', '.join(DEVICES)}; got {self.device!r}.")
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise QLoRAPluginError(
                f"`--dtype` must be one of auto, bfloat16, float16, float32; got {self.dtype!r}."
            )
        if self.malloc not in MALLOC_MODES:
            raise QLoRAPluginError(f"`--malloc` must be one of {', '.join(MALLOC_MODES)}; got {self.malloc!r}.")
        if self.optim is not None and self.optim not in OPTIMIZERS:
            raise QLoRAPluginError(
                f"`--optim {self.optim}` is not modelled by plan. Supported: {', '.join(OPTIMIZERS)}."
            )


@dataclass
class Plan:
    """One strategy's prediction. `components` are bytes; `total_bytes` is their sum (the predicted peak)."""

    strategy: str
    components: dict
    details: dict = field(default_factory=dict)
    step_cost: StepCost | None = None  # the step at any batch, for `--memory_budget` (not in `--json`)

    @property
    def total_bytes(self) -> int:
        return int(sum(self.components.values()))

    @property
    def eval_bytes(self) -> int:
        """The peak while evaluating during training: weights, adapters, optimizer state and runtime stay;
        gradients are freed (`zero_grad(set_to_none=True)`); the evaluation forward's transient replaces the
        training activations, beside what the allocator holds: the larger of its share of the evaluation's
        transient and what it kept of the training steps before (`allocator`), which the evaluation's blocks reuse
        where they fit and its mapped blocks cannot (G2's shape: 2,151 MiB planned without it, 2,334 measured)."""
        kept = sum(v for k, v in self.components.items() if k not in TRAINING_ONLY)
        share = self.details.get("eval_allocator_share", self.details.get("allocator_share", 0))
        transient = self.details["eval_activations"]
        held = kept_of(self.details.get("allocator_mode", "glibc"), transient, share)
        return int(kept + transient + max(held, self.components.get("allocator", 0)))

    def as_dict(self) -> dict:
        return {"strategy": self.strategy, "total_bytes": self.total_bytes, "eval_peak_bytes": self.eval_bytes,
                "components": dict(self.components), "details": dict(self.details)}


def running_malloc_mode() -> str:
    """The allocator mode of this process: "tuned" when glibc was started with `qlora-plugin run`'s settings (or
    the user's own for them), else "glibc" (its defaults)."""
    import os

    from qlora_plugin.cpu.malloc_tunables import SETTINGS, TUNABLES_ENV

    names = {entry.split("=", 1)[0] for entry in os.environ.get(TUNABLES_ENV, "").split(":") if entry}
    return "tuned" if all(name in names for name, _ in SETTINGS) else "glibc"


def compute_dtype_name(settings: PlanSettings, options: StrategyOptions) -> str:
    """The same choice as `quantization.compute_dtype`, for a device we may not be running on."""
    if options.bnb_4bit_compute_dtype != "auto":
        return options.bnb_4bit_compute_dtype
    if settings.dtype != "auto":
        return settings.dtype
    native = True if settings.device == "cuda" else cpu_has_native_bf16()
    return "bfloat16" if native else "float32"


def _optimizer_bytes(kind: str, params) -> int:
    total = 0
    for p in params:
        n = p.numel()
        if kind == "fp32" or (kind == "8bit" and n < BNB_MIN_8BIT_SIZE):
            total += 8 * n
        elif kind == "8bit":
            total += 2 * (n + 4 * math.ceil(n / 256))
        elif kind == "param":
            total += 2 * n * p.element_size()
        elif kind == "factored":
            total += 4 * (p.shape[0] + p.shape[-1]) if p.dim() >= 2 else 4 * n
    return total


def paged_optimizer_bytes(optim: str, params) -> int:
    """Bytes of the optimizer state bitsandbytes keeps in CUDA unified memory (paged optimizers, parameters of
    100,000+ elements): outside `torch.cuda.max_memory_reserved`, on the GPU until memory runs short."""
    if not optim.startswith("paged"):
        return 0
    return _optimizer_bytes(OPTIMIZERS[optim], [p for p in params if p.numel() >= BNB_PAGED_MIN_NUMEL])


def amp_dtype(compute: str) -> str | None:
    """The recipe's mixed precision for a compute dtype: bf16 or fp16 autocast with 16-bit compute, none in fp32."""
    return compute if compute in ("bfloat16", "float16") else None


def parameter_costs(model, options: StrategyOptions) -> dict:
    """Bytes of a skeleton's parameters as trained: 4-bit packed codes and constants, everything else frozen at
    its dtype (buffers included), and the list of trainable parameters."""
    backend = backend_for(options)
    costs = {"packed": 0, "constants": 0, "other": 0, "layers_4bit": 0, "params_4bit": 0, "largest_4bit": 0,
             "trainable": []}
    seen = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if param.requires_grad:
                costs["trainable"].append(param)
            elif isinstance(module, QuantizedLinearStandIn) and name == "weight":
                cost = backend.weight_bytes(param.numel(), param.shape[0], options)
                costs["packed"] += cost["packed"]
                costs["constants"] += cost["constants"]
                costs["layers_4bit"] += 1
                costs["params_4bit"] += param.numel()
                costs["largest_4bit"] = max(costs["largest_4bit"], param.numel())
            else:
                costs["other"] += param.numel() * param.element_size()
    costs["other"] += sum(b.numel() * b.element_size() for b in model.buffers())
    return costs


def qlora_base_bytes(model: str, compute: str = "float32", options: StrategyOptions | None = None) -> int:
    """The plan's 4-bit base (packed + constants + the rest in fp32) for a model folder, without the adapter:
    what an fp32 4-bit load holds, to compare with `get_memory_footprint() + quant_state_bytes()`."""
    options = options or StrategyOptions()
    costs = parameter_costs(skeleton(load_config(model), QLORA, options, compute), options)
    return costs["packed"] + costs["constants"] + costs["other"]


def plan_strategy(config, name: str, strategy, options: StrategyOptions, settings: PlanSettings, pm=None) -> Plan:
    """Predict the peak of one strategy; `strategy` None is 16-bit full fine-tuning (`name` then `full`)."""
    full = strategy is None
    compute = compute_dtype_name(settings, options)

    def build(cfg):
        return skeleton(cfg, strategy, options, compute, pm, settings.trust_remote_code, settings.device)

    model = build(config)
    num_params = count_parameters(model)
    runtime = Runtime(settings.device, compute == "bfloat16", "none")
    defaults = training_defaults(num_params, runtime)
    optim = settings.optim or defaults["optim"]
    checkpointing = defaults["activation_checkpointing"] if settings.gradient_checkpointing is None \
        else settings.gradient_checkpointing

    costs = parameter_costs(model, options)
    weights, packed, constants, trainable = costs["other"], costs["packed"], costs["constants"], costs["trainable"]
    layers_4bit, params_4bit = costs["layers_4bit"], costs["params_4bit"]
    adapters = sum(p.numel() * p.element_size() for p in trainable)
    acts = activation_bytes(config, build, settings.batch_size, settings.seq_len, checkpointing, amp_dtype(compute),
                            settings.device)
    evaluation = eval_transient(model, settings.eval_batch_size, settings.seq_len, settings.device)
    lora_init = None if full else getattr(model, "qlora_lora_init", {}).get("method")
    stack_per_token = (evaluation["stack"] // settings.seq_len) if evaluation["stack"] else None
    start = start_transient_bytes(model, lora_init, stack_per_token, settings.device)
    cuda = settings.device == "cuda"
    itemsize = 2 if compute in ("bfloat16", "float16") else 4
    cost = StepCost(gradients=adapters, gradients_heap=on_heap(p.numel() * p.element_size() for p in trainable),
                    dequantized=costs["largest_4bit"] * itemsize, profile=acts["profile"], head=acts["head"],
                    layer_phase_per_sample=acts["layer_phase_per_sample"], mode=mode_of(settings.device,
                                                                                        settings.malloc))
    batch = settings.batch_size
    components = {
        "weights": weights + packed + constants + (adapters if full else 0),  # full: the trained set is the base
        "adapters": 0 if full else adapters,
        "gradients": adapters,
        "optimizer": _optimizer_bytes(OPTIMIZERS[optim], trainable),
        # the decoder stack's, and a 4-bit layer's weight dequantized into the compute dtype for its matmul
        "activations": cost.activations(batch),
        "loss": cost.loss(batch),
        "allocator": cost.allocator(batch),
        "runtime": CUDA_CONTEXT_BYTES if cuda else CPU_RUNTIME_BYTES,
    }
    # the start runs before the first step, beside the resident model but before the optimizer state, gradients
    # and activations exist: it raises the peak only by what it holds beyond them
    step = components["optimizer"] + cost.transients(batch)
    components["start"] = max(start["total"] - step, 0)
    paged = paged_optimizer_bytes(optim, trainable) if cuda else 0
    details = {
        "params": num_params,
        "trainable_params": sum(p.numel() for p in trainable),
        "layers_4bit": layers_4bit,
        "params_4bit": params_4bit,
        "bits_per_4bit_param": round(8 * (packed + constants) / params_4bit, 4) if params_4bit else None,
        "weights_4bit_packed_bytes": packed,
        "weights_4bit_constants_bytes": constants,
        "weights_other_bytes": weights,
        "compute_dtype": compute,
        "adapter_dtype": trainable_dtype(compute, fp16_amp=False),
        "optimizer": optim,
        "gradient_checkpointing": checkpointing,
        "batch_size": settings.batch_size,
        "seq_len": settings.seq_len,
        "device": settings.device,
        "activations_without_checkpointing": acts["without_checkpointing"],
        "eval_batch_size": settings.eval_batch_size,
        "eval_activations": evaluation["total"],
        "eval_stack_per_sample": evaluation["stack"],
        "loss_path": acts["loss_how"],
        "head": acts["head"],
        "layer_phase_per_sample": acts["layer_phase_per_sample"],
        "activations_with_checkpointing": acts["with_checkpointing"],
        "lora_r": None if full else options.lora_r,
        # how the adapter starts, and what computing that start holds for a moment before the first step
        "lora_init": lora_init,
        "start_transient_bytes": start["total"],
        "start_parts": {k: v for k, v in start.items() if k != "total"},
        "mixed_precision": amp_dtype(compute),
        "allocator_share": ALLOCATOR_SHARE[cost.mode],
        "allocator_mode": cost.mode,
        # evaluation with the fused head's buffer mapped on its own (`loss.buffer_mapped`): its tiles are mapped and
        # given back, so the process grows by the transient itself (TRL's head alone, 2,040 tokens x 128,256 entries
        # under `qlora-plugin run`: +956-973 MiB for 976 counted; docs/plan.md, "The validation grid")
        "eval_allocator_share": 0 if not cuda and evaluation["head"] and buffer_mapped(evaluation["head"],
                                                                                 settings.eval_batch_size)
        else ALLOCATOR_SHARE[cost.mode],
        "allocator_how": how(cost.mode),
        "optimizer_paged_bytes": paged,
        # what `torch.cuda.max_memory_reserved` should show: all but the CUDA context and the paged state
        "allocator_bytes": sum(components.values()) - components["runtime"] - paged if cuda else None,
    }
    return Plan(name, components, details, cost)


def _for_16bit(explicit_options: dict) -> dict:
    """The options of a 16-bit plan shown beside a 4-bit one: a 4-bit-only adapter start (the LoftQ ones) does
    not apply to it (and costs no memory), so it is planned with peft's default start, as the table says."""
    if explicit_options.get("init_lora_weights") in ("loftq", "loftq_calibrated"):
        return {**explicit_options, "init_lora_weights": "default"}
    return explicit_options


def make_plans(model: str, strategies: list[str] | None, settings: PlanSettings, explicit_options: dict,
               hook_files=(), pm=None, plan=None) -> list[Plan]:
    """Plans for `strategies` (default: qlora, lora, full) of the model whose config is at `model`, with the
    plugins of `pm` (default: a manager with `hook_files`); `plan` makes each (default `plan_strategy`, SFT's;
    another trainer's: `trainer_passes.planner`)."""
    pm = pm or get_plugin_manager(list(hook_files))
    available, extra = collect_strategies(pm), collect_options(pm)
    resolved = []
    for name in strategies or ["qlora", "lora", FULL]:
        if name == FULL:
            resolved.append((name, None, build_options({"load_in_4bit": False}, _for_16bit(explicit_options), extra)))
        elif name in available:
            strategy = available[name]
            options = build_options(dict(strategy.option_defaults), explicit_options, extra)
            if not options.load_in_4bit and not strategies:  # a 16-bit plan shown beside the 4-bit one
                options = build_options(dict(strategy.option_defaults), _for_16bit(explicit_options), extra)
            resolved.append((name, strategy, options))
        else:
            raise unknown_strategy_error(name, [*available, FULL])
    config = load_config(model, settings.trust_remote_code)
    plan = plan or plan_strategy
    return [plan(config, name, strategy, options, settings, pm) for name, strategy, options in resolved]


def evaluates_during_training(training_args) -> bool:
    """Whether the trainer evaluates inside `train()` (an eval strategy, or `eval_on_start`): then the run's peak
    from the first step on is the larger of a training step's and an evaluation's."""
    strategy = getattr(training_args, "eval_strategy", "no")
    return str(getattr(strategy, "value", strategy)) != "no" or bool(getattr(training_args, "eval_on_start", False))


def padded_length(length: int, multiple) -> int:
    """`length` tokens rounded up to `multiple` (`pad_to_multiple_of`: collators pad a batch's rows to it after
    truncating them to `max_length`); unchanged without one."""
    return -(-length // multiple) * multiple if isinstance(multiple, int) and multiple > 1 else length


def trained_length(training_args) -> int:
    """The most tokens a row of this run holds: `max_length` (TRL's 1,024 if none), padded to `pad_to_multiple_of`."""
    return padded_length(getattr(training_args, "max_length", None) or 1024,
                         getattr(training_args, "pad_to_multiple_of", None))


def predict_for_run(model_config, strategy, options: StrategyOptions, training_args, device: str,
                    compute: str, pm=None, plan=None, seq_len: int | None = None) -> dict:
    """The plan for a training run's actual settings, for `qlora_plugin_report.json` (next to the measured peak).
    `seq_len`: the longest row the run really had, when shorter than `max_length` (the report re-plans with it when
    training ends: collators pad each batch to its longest row, not to `max_length`).

    A plan that cannot be made (an optimizer plan does not model, an exotic architecture) is reported, not raised:
    the prediction must never stop a training run.
    """
    config = copy.deepcopy(model_config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    try:
        settings = PlanSettings(
            batch_size=training_args.per_device_train_batch_size,
            seq_len=seq_len or trained_length(training_args),
            eval_batch_size=training_args.per_device_eval_batch_size,
            device="cuda" if device == "cuda" else "cpu", dtype=compute, optim=optim_name(training_args),
            gradient_checkpointing=bool(getattr(training_args, "activation_checkpointing",
                                                training_args.gradient_checkpointing)),
            malloc=running_malloc_mode(),
        )
        # `plan`: another TRL trainer's (`trainer_passes.planner`: its rows, reference and generation passes)
        plan = (plan or plan_strategy)(config, strategy.name, strategy, options, settings, pm)
    except Exception as err:  # noqa: BLE001 - see docstring
        return {"predicted_peak_bytes": None, "prediction_failed": f"{type(err).__name__}: {err}"}
    step_peak = plan.total_bytes - plan.components["start"]
    return {"predicted_peak_bytes": plan.total_bytes, "predicted_eval_peak_bytes": plan.eval_bytes,
            # the run measures its peak from the first step, after the adapter's start: compared with this (with
            # the evaluations run during training, the larger of a step's and an evaluation's)
            "predicted_step_peak_bytes": max(step_peak, plan.eval_bytes) if evaluates_during_training(training_args)
            else step_peak,
            "predicted_components": plan.components, "predicted_allocator_bytes": plan.details["allocator_bytes"],
            "predicted_for": {k: plan.details[k] for k in ("batch_size", "seq_len", "gradient_checkpointing",
                                                            "optimizer", "device", "compute_dtype",
                                                            "mixed_precision", "allocator_how", "loss_path")}}
