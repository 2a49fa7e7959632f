"""`qlora-plugin plan MODEL ...`: parse the flags, make the plans (`planning`), show a table, JSON or a picture.

Strategy options use the same flags as training (`--lora_r 16`, `--use_bnb_nested_quant false`, ...), parsed by
the same parser the activation uses; training settings that change memory use TRL's names
(`--per_device_train_batch_size`, `--max_length`, `--optim`, `--gradient_checkpointing`, `--dtype`) or the short
`--batch-size` / `--seq-len`. Anything else is an error, never ignored.
"""

from __future__ import annotations

import argparse
import json
import os

from qlora_plugin.core.errors import QLoRAPluginError
from qlora_plugin.core.files import atomic_path
from qlora_plugin.core.flags import parse_bool, parse_own_flags
from qlora_plugin.models.model_config import load_config
from qlora_plugin.core.options import build_options
from qlora_plugin.plan.budget import budget_bytes, choose
from qlora_plugin.plan.estimate import COMPONENTS, PlanSettings, make_plans
from qlora_plugin.plan.trainer_passes import (
    TRAINERS, TRL_MAX_COMPLETION, TrainerPasses, passes_line, peaks_for, planner,
)
from qlora_plugin.plugin.manager import collect_options, get_plugin_manager, get_strategy, hook_files_from_env
from qlora_plugin.core.sizes import parse_memory

GIB = 2**30
TRL_DEFAULT_BATCH = 8  # `per_device_train_batch_size` of TRL's SFTConfig: the samples per step a budget keeps
# Named GPUs without native bf16 (compute capability below 8.0): the strategy trains in fp16 there, with fp32
# adapters (`Runtime.half_dtype`), so `--gpu-memory NAME` plans with that unless `--dtype` says otherwise.
NO_NATIVE_BF16 = ("t4", "v100-32gb")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qlora-plugin plan", allow_abbrev=False,
        description="Predict peak training memory from config.json alone (nothing is downloaded or loaded).",
        epilog="Strategy options are accepted with their training flags (--lora_r, --lora_target_modules, "
               "--use_bnb_nested_quant, --bnb_4bit_compute_dtype, ...; see `qlora-plugin options`). "
               "Accuracy and a worked example: docs/plan.md.",
    )
    parser.add_argument("model", help="Local model folder with config.json, or a hub id.")
    parser.add_argument("--batch-size", "--per_device_train_batch_size", dest="batch_size", type=int, default=None,
                        help="Per-device train batch (default 1; with --memory_budget: chosen, keeping batch x "
                        "accumulation, unless you give it).")
    parser.add_argument("--gradient-accumulation-steps", "--gradient_accumulation_steps",
                        dest="gradient_accumulation_steps", type=int, default=1,
                        help="With --memory_budget: the effective batch is batch x this; the choice keeps it.")
    parser.add_argument("--eval-batch-size", "--per_device_eval_batch_size", dest="eval_batch_size", type=int,
                        default=None, help="Per-device evaluation batch (default: the training batch).")
    parser.add_argument("--seq-len", "--max_length", dest="seq_len", type=int, default=512,
                        help="Tokens per sequence (default 512).")
    parser.add_argument("--optim", default=None, help="Optimizer (default: the recipe's paged_adamw_32bit).")
    parser.add_argument("--gradient_checkpointing", "--gradient-checkpointing", type=parse_bool, default=None,
                        metavar="true|false", help="Default: the recipe's (on).")
    parser.add_argument("--dtype", default="auto",
                        help="Compute dtype (default: bf16 on cuda; fp16 with fp32 adapters when --gpu-memory names a "
                             f"GPU without bf16: {', '.join(NO_NATIVE_BF16)}; fp32 on a CPU without bf16).")
    parser.add_argument("--device", default=None,
                        help="cuda (allocator peak) or cpu (process RSS); default: cuda with --gpu-memory, else the "
                             "machine plan runs on (cuda when torch sees a GPU, else cpu), said in the output.")
    parser.add_argument("--malloc", default="tuned", choices=("tuned", "glibc"),
                        help="--device cpu: glibc's malloc as `qlora-plugin run` starts it (tuned, default) or with "
                             "its defaults (glibc; the allocator then holds about twice as much, docs/plan.md).")
    parser.add_argument("--gpu-memory", default=None, help="Say whether the peak fits: 48GB, 80GiB, a100-80gb, ...")
    parser.add_argument("--trainer", default="sft", choices=TRAINERS,
                        help="The TRL trainer (default sft): dpo/reward train chosen+rejected as 2 x batch rows; "
                             "dpo/kto/rloo (and grpo with --beta) add a reference pass; grpo/rloo a generation batch, "
                             "where --seq-len is the prompt's tokens (docs/plan.md, \"Other trainers\").")
    parser.add_argument("--beta", type=float, default=None, help="--trainer grpo/rloo: KL weight (TRL's default).")
    parser.add_argument("--precompute_ref_log_probs", type=parse_bool, default=False, metavar="true|false",
                        help="--trainer dpo/kto: reference log-probs computed before training.")
    parser.add_argument("--max_completion_length", type=int, default=None,
                        help=f"--trainer grpo/rloo: generated tokens (default TRL's {TRL_MAX_COMPLETION}).")
    parser.add_argument("--num_generations", type=int, default=None,
                        help="--trainer grpo/rloo: completions per prompt (TRL's default).")
    parser.add_argument("--steps_per_generation", type=int, default=None,
                        help="--trainer grpo/rloo: the generation batch is batch x this (default: the accumulation).")
    parser.add_argument("--json", action="store_true", help="Print JSON instead of a table.")
    parser.add_argument("--plot", default=None, metavar="FILE.png", help="Also draw stacked bars per strategy.")
    parser.add_argument("--trust-remote-code", "--trust_remote_code", dest="trust_remote_code",
                        action="store_true", help="Allow a config with custom code (only if you trust it).")
    return parser


def _split_flags(argv: list[str]) -> tuple[dict, list[str]]:
    """The strategy flags (as activation parses them) and the rest, for the plan parser."""
    given, rest = parse_own_flags(argv)
    for flag in ("use_peft", "load_in_8bit"):
        if flag in given:
            raise QLoRAPluginError(f"`--{flag}` has no meaning for plan; pick a strategy with --strategy "
                                   "(lora-int8: an 8-bit base).")
    return given, rest


def _check_plot_path(path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
        raise QLoRAPluginError(f"Cannot write the plot to {path!r}: {directory} is not a writable folder.")
    if os.path.splitext(path)[1].lower() not in (".png", ".svg", ".pdf"):
        raise QLoRAPluginError(f"`--plot {path}`: use a .png, .svg or .pdf file name.")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise QLoRAPluginError("`--plot` needs matplotlib: pip install 'qlora-plugin[plot]'") from None


def _size(n: int) -> str:
    if not n:
        return "-"
    return f"{n / GIB:,.2f} GiB" if n >= GIB else f"{n / 2**20:,.1f} MiB"


def _count(n: int) -> str:
    """A parameter count people read: 1.24B, 135.0M, 12.3K, 512."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:,.{2 if unit == 'B' else 1}f}{unit}"
    return str(n)


def this_machine() -> tuple[str, str]:
    """The device `plan` defaults to -- the one it runs on -- and how it was chosen, for the output."""
    import torch

    if torch.cuda.is_available():
        return "cuda", "this machine's GPU; --device cpu plans for the CPU"
    return "cpu", "this machine has no GPU torch can use; --device cuda plans for a GPU"


def format_table(plans, model: str, gpu_memory: int | None, gpu_label: str = "", device_note: str = "") -> str:
    first = plans[0].details
    lines = [f"Peak training memory for {model} ({_count(first['params'])} params), batch {first['batch_size']} "
             f"x {first['seq_len']} tokens, device {first['device']}" + (f" ({device_note})" if device_note else "")]
    width = 16
    lines.append("component".ljust(16) + "".join(p.strategy.rjust(width) for p in plans))
    for name in COMPONENTS:
        if name in ("runtime", "reference", "generation") and not any(p.components.get(name) for p in plans):
            continue
        lines.append(name.ljust(16) + "".join(_size(p.components.get(name, 0)).rjust(width) for p in plans))
    lines.append("peak".ljust(16) + "".join(_size(p.total_bytes).rjust(width) for p in plans))
    lines.append(f"eval peak (x{first['eval_batch_size']})".ljust(16)
                 + "".join(_size(p.eval_bytes).rjust(width) for p in plans))
    if gpu_memory:
        verdicts = ["fits" if max(p.total_bytes, p.eval_bytes) <= gpu_memory else "does not fit" for p in plans]
        lines.append(f"in {gpu_label}".ljust(16) + "".join(v.rjust(width) for v in verdicts))
    lines.append("")
    for p in plans:
        d = p.details
        bits = (f", 4-bit layers {d['layers_4bit']} at {d['bits_per_4bit_param']} bits per 4-bit weight, all "
                f"storage" if d["layers_4bit"] else "")
        adapters = f" (adapters {d['adapter_dtype']})" if d.get("adapter_dtype", d["compute_dtype"]) != d["compute_dtype"] else ""
        lines.append(f"{p.strategy}: compute {d['compute_dtype']}{adapters}, optimizer {d['optimizer']}, gradient "
                     f"checkpointing {'on' if d['gradient_checkpointing'] else 'off'}, "
                     f"{'LoRA init ' + d['lora_init'] + ', ' if d.get('lora_init') else ''}trainable "
                     f"{d['trainable_params']:,} params{bits}; activations without/with checkpointing "
                     f"{_size(d['activations_without_checkpointing'])} / {_size(d['activations_with_checkpointing'])}")
        if passes_line(d):
            lines.append(passes_line(d))
        lines.append(f"  loss: {d['loss_path']}; allocator: {d['allocator_how']}"
                     + (f"; the {d['lora_init']} start holds {_size(d['start_transient_bytes'])} before the first step"
                        if d.get("start_transient_bytes") else ""))
    if any(p.details["layers_4bit"] for p in plans):
        lines.append(BITS_NOTE)
    lines += _sharded_loading_notes(plans, gpu_memory)
    return "\n".join(lines)


# Why plan's bits per 4-bit weight is above the run summary's 4.127 (the paper's figure with double quantization).
BITS_NOTE = ("bits per 4-bit weight: codes and block scales (what a run's summary and the paper count: 4.127 with "
             "double quantization, 4.5 without) plus each layer's fixed constants (a 1 KiB lookup table and a few "
             "scalars), which weigh more the smaller the layers")


def _sharded_loading_notes(plans, gpu_memory: int | None) -> list[str]:
    """For a 4-bit plan that does not fit one GPU: FSDP / ZeRO-3 over several do not help at load time. With
    transformers 5.24 every rank loads the whole 4-bit base onto its own GPU (the bitsandbytes quantizer maps an
    unset device map to the current GPU; the rank-0-only loading paths leave quantized models out), and only
    then are the parameters sharded (docs/distributed.md)."""
    notes = []
    for p in plans:
        if gpu_memory and p.details["layers_4bit"] and p.total_bytes > gpu_memory:
            base = p.components["weights"]
            verdict = "fits" if base <= gpu_memory else "does not fit"
            notes.append(f"{p.strategy} on several GPUs (FSDP / ZeRO-3): each GPU still holds the whole 4-bit base "
                         f"while the model loads ({_size(base)}, which {verdict} in one GPU)")
    return notes


def draw_plot(plans, model: str, gpu_memory: int | None, gpu_label: str = ""):
    """Stacked bars per strategy, one colour per component. Each strategy's peak is written under its bar, and the
    legend sits beside the axes, so no label can cover the bars or the GPU's memory line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    largest = max([p.total_bytes for p in plans] + [gpu_memory or 0])
    unit, scale = ("GiB", GIB) if largest >= GIB else ("MiB", 2**20)
    fig, ax = plt.subplots(figsize=(3.2 + 1.6 * len(plans), 4.5))
    bottoms = [0.0] * len(plans)
    names = [f"{p.strategy}\npeak {_size(p.total_bytes)}" for p in plans]
    for component in COMPONENTS:
        values = [p.components.get(component, 0) / scale for p in plans]
        if any(values):
            ax.bar(names, values, bottom=bottoms, label=component)
            bottoms = [b + v for b, v in zip(bottoms, values)]
    if gpu_memory:
        ax.axhline(gpu_memory / scale, color="black", linestyle="--", label=f"GPU {gpu_label}")
    ax.set_ylim(0, largest / scale * 1.08)
    ax.set_ylabel(unit)
    ax.set_title(f"Predicted peak training memory: {os.path.basename(model.rstrip('/'))}")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.tight_layout()
    return fig


def write_plot(plans, path: str, model: str, gpu_memory: int | None, gpu_label: str = "") -> None:
    """`draw_plot`, written to a temporary file, then renamed."""
    import matplotlib.pyplot as plt

    fig = draw_plot(plans, model, gpu_memory, gpu_label)
    try:
        with atomic_path(path, os.path.splitext(path)[1]) as tmp:
            fig.savefig(tmp)
    finally:
        plt.close(fig)


def _budget_choice(args, name: str, settings, given: dict, pm, passes=None) -> dict:
    """What `--memory_budget` would choose for this run (the training pipeline makes the same call)."""
    config = load_config(args.model, args.trust_remote_code)
    strategy = get_strategy(pm, name)
    options = build_options(dict(strategy.option_defaults), given, collect_options(pm))
    budget, how = budget_bytes(options.memory_budget, settings.device)
    explicit = args.batch_size if args.batch_size_given else None
    per_device = args.batch_size if args.batch_size_given else TRL_DEFAULT_BATCH  # as a training run's default
    choice = choose(config, name, strategy, options, settings, budget, per_device * args.gradient_accumulation_steps,
                    settings.eval_batch_size, explicit, args.eval_batch_size, options.strict_budget, pm,
                    trainer_peaks=peaks_for(passes))
    return {**choice, "how": how}


def _passes(args) -> TrainerPasses | None:
    """The trainer's passes from the flags (None: SFT); a trainer's flag given for another trainer is an error."""
    own = {"beta": ("dpo", "kto", "grpo", "rloo"), "precompute_ref_log_probs": ("dpo", "kto"),
           "max_completion_length": ("grpo", "rloo"), "num_generations": ("grpo", "rloo"),
           "steps_per_generation": ("grpo", "rloo")}
    for flag, kinds in own.items():
        if getattr(args, flag) not in (None, False) and args.trainer not in kinds:
            raise QLoRAPluginError(f"`--{flag}` applies to --trainer {'/'.join(kinds)} only; got --trainer "
                                   f"{args.trainer}. Remove it or pick one of those trainers.")
    if args.trainer == "sft":
        return None
    return TrainerPasses(args.trainer, args.beta, args.precompute_ref_log_probs, args.max_completion_length,
                         args.num_generations, args.steps_per_generation or args.gradient_accumulation_steps)


def main(argv: list[str]) -> int:
    given, rest = _split_flags(argv)
    hooks = [*hook_files_from_env(), *(given.pop("qlora_hooks", None) or [])]
    pm = get_plugin_manager(hooks)  # the command's one manager: its plugins' options, the plans, the budget choice
    extra = collect_options(pm)
    if extra:  # the options plugins add (`qlora_register_options`)
        plugin_given, rest = parse_own_flags(rest, extra)
        given.update({o.name: plugin_given[o.name] for o in extra if o.name in plugin_given})
    args = make_parser().parse_args(rest)
    args.batch_size_given = args.batch_size is not None
    if args.batch_size is None:
        args.batch_size = 1
    strategy = given.pop("strategy", None)
    gpu_memory = parse_memory(args.gpu_memory) if args.gpu_memory else None
    if args.plot:
        _check_plot_path(args.plot)
    device_note = ""
    if args.device is None and args.gpu_memory:
        args.device, device_note = "cuda", "--gpu-memory names a GPU"
    elif args.device is None:
        args.device, device_note = this_machine()
    dtype = args.dtype
    if dtype == "auto" and args.device == "cuda" and (args.gpu_memory or "").strip().lower() in NO_NATIVE_BF16:
        dtype = "float16"
    settings = PlanSettings(batch_size=args.batch_size, seq_len=args.seq_len, eval_batch_size=args.eval_batch_size,
                            device=args.device, dtype=dtype,
                            optim=args.optim, gradient_checkpointing=args.gradient_checkpointing, malloc=args.malloc,
                            trust_remote_code=args.trust_remote_code)
    passes = _passes(args)
    if given.get("memory_budget") and passes is not None and passes.kind in ("grpo", "rloo"):
        raise QLoRAPluginError(f"`--memory_budget` cannot size --trainer {passes.kind} batches: a training run's config "
                               "bounds no prompt length. Drop it and read the peak per --batch-size here.")
    plans = make_plans(args.model, [strategy] if strategy else None, settings, given, hooks, pm, plan=planner(passes))
    choice = _budget_choice(args, strategy or "qlora", settings, given, pm, passes) \
        if given.get("memory_budget") else None
    if args.json:
        objects = [{**p.as_dict(), **({"fits": max(p.total_bytes, p.eval_bytes) <= gpu_memory} if gpu_memory else {})}
                   for p in plans]
        if choice:
            objects[0]["memory_budget"] = choice
        print(json.dumps(objects[0] if len(objects) == 1 else objects, indent=2))
    else:
        print(format_table(plans, args.model, gpu_memory, args.gpu_memory, device_note))
        if choice:
            print(f"\nmemory budget {choice['budget_bytes'] / 2**20:,.0f} MiB ({choice['how']}), {strategy or 'qlora'}: "
                  f"per-device batch {choice['per_device_train_batch_size']} x accumulation "
                  f"{choice['gradient_accumulation_steps']}, eval batch {choice['per_device_eval_batch_size']}; "
                  f"predicted peak {_size(choice['predicted_peak_bytes'])} "
                  f"(eval {_size(choice['predicted_eval_peak_bytes'])}); "
                  f"{choice['error_margin']:.0%} of the budget kept for the plan's error")
            for note in choice["notes"]:
                print(f"warning: {note}")
    if args.plot:
        write_plot(plans, args.plot, args.model, gpu_memory, args.gpu_memory)
        if not args.json:
            print(f"plot written to {args.plot}")
    return 0
