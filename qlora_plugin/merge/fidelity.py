"""How faithful a merge is: the merged model against what was trained (the adapter on its 4-bit base).

Run by `qlora-plugin merge` on the written folder before it is put in place. On a dozen prompts it compares the
next-token distributions of the merged model with the reference, the adapter loaded by peft on the base rebuilt as
training held it (`rounding_floor.py`); beside them, the reference against itself with every weight off by the
output dtype's rounding error (the floor no merge in that dtype can beat) and, for a 4-bit base, peft's usual merge
into the original 16-bit weights, to show what the quantization-aware merge avoids. Figures: the mean KL divergence
(reference || model), the gate's figure; the largest logit difference relative to the largest reference logit;
the share of positions where the greedy token agrees (shown, not gated: near-ties flip under any rounding).
Every model and the batch sit on one device (`check_device`), each computed in float32, one at a time; when that
would not fit the device's memory, the same figures are computed block by block (`block_check.py`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from qlora_plugin.core.errors import QLoRAPluginError
from qlora_plugin.core.files import write_json_atomic
from qlora_plugin.merge import rounding_floor
from qlora_plugin.merge.classifier import is_classifier_config, model_class
from qlora_plugin.ecosystem.notices import library_deprecations
from qlora_plugin.quant.cpu_guard import make_cpu_inference_safe
from qlora_plugin.quant.backends import backend_named

REPORT_FILE = "merge_report.json"
# The gate (thresholds measured on SmolLM2-135M-Instruct, docs/merge.md "How the check decides"): the merge's mean
# KL from the reference may be at most KL_FACTOR times the output dtype's rounding floor (the reference against
# itself with every weight off by that dtype's rounding error, `rounding_floor.py`), plus KL_TOLERANCE nats, the
# float32 arithmetic's own noise (by Pinsker, a total-variation distance of at most 0.07%).
KL_FACTOR = 4.0
KL_TOLERANCE = 1e-6
# A reward model's classifier has one score per prompt, so no distribution to take a KL of: its gate is the largest
# score difference relative to the largest reference score, at most KL_FACTOR times the rounding floor's plus this.
SCORE_TOLERANCE = 1e-4
FLOOR_SEED = 0
MAX_TOKENS = 128  # per prompt: bounds the logits kept (positions x vocabulary, float32)
NAIVE_MAX_PARAMS = 8e9  # the naive merge is shown up to this size: above it, a third full load is not worth it
MEMORY_FRACTION = 0.8  # of what the device has available, the check may plan to use
DEFAULT_PROMPTS = (
    "The capital of France is Paris, a city on the Seine known for its museums, its cafes and the tower that "
    "Gustave Eiffel built for the world fair of 1889.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n"
    "print([fibonacci(i) for i in range(10)])",
    "Question: What is 12 times 7?\nAnswer: 12 times 7 is 84, because 10 times 7 is 70 and 2 times 7 is 14.",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who went out every morning "
    "before the sun rose and came back with whatever the waves had left him.",
    "Translate to German: Good morning, how are you? I would like a cup of coffee and a slice of apple cake.",
    "The three laws of thermodynamics are about energy, entropy and absolute zero: energy is conserved, entropy "
    "of an isolated system never decreases, and absolute zero cannot be reached.",
    "Dear hiring manager, I am writing to apply for the position of data analyst. In my previous role I built "
    "reports that the sales team used every week.",
    "Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide to make glucose "
    "and release oxygen into the air.",
    "To install the package, run pip install requests, then import it in Python and call requests.get with the "
    "address of the page you want to download.",
    "User: Can you recommend a good book about the history of mathematics?\nAssistant: A popular choice is "
    "Journey through Genius by William Dunham, which walks through great theorems.",
    "SELECT name, COUNT(*) AS orders FROM customers JOIN orders ON customers.id = orders.customer_id GROUP BY "
    "name ORDER BY orders DESC LIMIT 10;",
    "In 1969 the Apollo 11 mission landed the first humans on the Moon. Neil Armstrong and Buzz Aldrin walked on "
    "the surface while Michael Collins stayed in orbit.",
)


def load_prompts(path: str | None, limit: int = 16) -> list[str]:
    """Up to `limit` texts from a .jsonl/.json file (`text`, `prompt`+`completion`, or chat `messages`), else
    the built-in prompts (a merge's fidelity is a property of the weights, not of the data)."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    try:
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()] if path.endswith(".jsonl") else json.load(f)
    except (OSError, ValueError) as err:
        raise QLoRAPluginError(
            f"--eval_data {path!r} cannot be read as JSON lines ({err}). Pass a .jsonl file with `text`, "
            "`prompt`+`completion` or `messages` rows."
        ) from None
    texts = [_text(row) for row in (rows if isinstance(rows, list) else [])][:limit]
    if not texts or not all(texts):
        raise QLoRAPluginError(
            f"--eval_data {path!r} has no usable rows: each needs `text`, `prompt` (+ `completion`) or `messages`."
        )
    return texts


def _text(row) -> str | None:
    if not isinstance(row, dict):
        return None
    if isinstance(row.get("text"), str):
        return row["text"]
    if isinstance(row.get("prompt"), str):
        return row["prompt"] + (row.get("completion") if isinstance(row.get("completion"), str) else "")
    messages = row.get("messages")
    if isinstance(messages, list) and messages:
        return "\n".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
    return None


def compare(reference, logits) -> dict:
    """The three figures for two [positions, vocab] logit tensors (KL in float64, a chunk of positions at a time,
    so the sum over a large vocabulary does not drown a small divergence in float32 rounding)."""
    import torch

    kl = torch.cat([torch.nn.functional.kl_div(
        b.double().log_softmax(-1), a.double().log_softmax(-1), log_target=True, reduction="none").sum(-1)
        for a, b in zip(reference.split(64), logits.split(64))])
    reference, logits = reference.float(), logits.float()
    return {
        "max_relative_logit_diff": ((logits - reference).abs().max() / reference.abs().max()).item(),
        "mean_kl": max(kl.mean().item(), 0.0),  # float rounding can make a zero KL slightly negative
        "greedy_agreement": (logits.argmax(-1) == reference.argmax(-1)).float().mean().item(),
    }


def check_device():
    """Where the check runs, every model and the batch alike: the current GPU if there is one (bitsandbytes would
    put the 4-bit reference there anyway), else the CPU."""
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def available_bytes(device) -> int:
    """Memory the check may use on `device`: what is free now (GPU) or available (host), times MEMORY_FRACTION."""
    import torch

    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        import psutil

        free = psutil.virtual_memory().available
    return int(free * MEMORY_FRACTION)


def needed_bytes(params: int, vocab: int, prompts: int) -> int:
    """The whole-model check's peak: one model computed in float32 (4 bytes a parameter; the models load one after
    another) plus three [positions, vocab] float32 logit tensors (the reference, the model's, a batch's)."""
    return 4 * params + 3 * 4 * vocab * prompts * MAX_TOKENS


def block_needed_bytes(shapes: dict, adapter_params: int, config, prompts: int) -> int:
    """The block-by-block check's peak (`block_check`): its largest stage in float32 (a decoder block, or the
    embedding or head on its own) with three float32 temporaries of its largest tensor (quantizing it, drawing
    the floor's rounding error), the adapter twice in float32 (the merge's copy and the check's), four
    [positions, vocab] float32 logit tensors (three kept, one being computed), and the three models' hidden states
    with one block's activations (three [positions, intermediate] float32 tensors)."""
    from qlora_plugin.merge.block_check import stage_params

    positions = prompts * MAX_TOKENS
    largest = max((_numel(s) for s in shapes.values() if s), default=0)
    hidden = getattr(config, "hidden_size", 0) or 0
    intermediate = getattr(config, "intermediate_size", 0) or 4 * hidden
    vocab = getattr(config, "vocab_size", 0) or 0
    return (4 * max(stage_params(shapes), default=0) + 3 * 4 * largest + 2 * 4 * adapter_params
            + 4 * 4 * vocab * positions + 4 * positions * (3 * hidden + 3 * intermediate))


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


@dataclass
class CheckPlan:
    """Where and how the check runs, decided by `plan_memory` before anything is written."""

    device: object  # a torch.device: every model and the batch
    blocks: str | None  # why the check runs block by block (`block_check`); None: the whole-model check


def plan_memory(config, shapes: dict, adapter_params: int, eval_data: str | None) -> CheckPlan:
    """How the check will run: on the check's device (`check_device`), else on the CPU when the machine has a GPU
    too small for it; whole when the whole-model check fits there, else block by block (`block_check`). A check
    that fits nowhere, or a model too large for the whole-model check that the block check cannot walk, is refused
    with the sizes, the reason and `--no_check`."""
    import torch

    from qlora_plugin.merge.block_check import unwalkable

    prompts = len(load_prompts(eval_data))
    needed = needed_bytes(sum(_numel(s) for s in shapes.values() if s), getattr(config, "vocab_size", 0) or 0, prompts)
    blocks, reason = block_needed_bytes(shapes, adapter_params, config, prompts), unwalkable(config)
    devices = [check_device()]
    devices += [torch.device("cpu")] if devices[0].type != "cpu" else []
    tried = []
    for device in devices:
        available = available_bytes(device)
        if needed <= available:
            return CheckPlan(device, None)
        tried.append(f"{available / 2**30:.1f} GiB on {device.type}")
        if reason is None and blocks <= available:
            return CheckPlan(device, f"the whole-model check needs about {needed / 2**30:.1f} GiB in float32, more "
                                     f"than it may use ({', '.join(tried)}): checked block by block on {device.type} "
                                     f"in about {blocks / 2**30:.1f} GiB")
    raise QLoRAPluginError(
        f"The fidelity check needs about {needed / 2**30:.1f} GiB to compute the merged model in float32, more than "
        f"it may use ({', '.join(tried)})" + (f", and it cannot run block by block: {reason}." if reason else
                                            f", and block by block it needs {blocks / 2**30:.1f} GiB.")
        + " Pass --no_check to merge without it (the merge itself streams the weights), or run merge on a machine "
        "with more memory."
    )


def check(adapter_dir: str, merged_dir: str, base_folder: str, settings: dict | None, out_dtype: str,
          eval_data: str | None = None, blocks: str | None = None, device=None) -> dict:
    """The fidelity report for a merged folder: figures for the merge, the output dtype's rounding floor and (4-bit
    base, up to NAIVE_MAX_PARAMS, whole-model check) the naive merge, the gate's bound, and whether it passed.
    `blocks` and `device` (from `plan_memory`): why the whole-model check does not fit, so the check runs block by
    block; where it runs (default: `check_device`)."""
    import gc

    import torch
    from transformers import AutoConfig, AutoTokenizer

    merged_config = AutoConfig.from_pretrained(merged_dir)
    classifier = is_classifier_config(merged_config)  # a reward model's classifier (`merge.classifier`)
    prompts = load_prompts(eval_data)
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = device or check_device()
    batch = tokenizer(prompts, return_tensors="pt", padding=True, truncation=True, max_length=MAX_TOKENS).to(device)
    mask = batch["attention_mask"].bool()

    def logits(model):
        with torch.no_grad():
            out = model.eval()(**batch).logits  # a classifier: one row of scores per prompt
            return (out if classifier else out[mask]).float()

    if blocks:
        from qlora_plugin.merge import block_check

        reference, floor_logits, merged_logits = block_check.logits(
            adapter_dir, merged_dir, base_folder, settings, out_dtype, batch, mask, device, FLOOR_SEED)
        floor, merged = compare(reference, floor_logits), compare(reference, merged_logits)
        del floor_logits, merged_logits
        params = None
    else:
        reference, floor, merged, params = _whole_model(adapter_dir, merged_dir, base_folder, settings, out_dtype,
                                                        merged_config, device, logits)
    if classifier:
        gated, bound = "max_relative_logit_diff", KL_FACTOR * floor["max_relative_logit_diff"] + SCORE_TOLERANCE
    else:
        gated, bound = "mean_kl", KL_FACTOR * floor["mean_kl"] + KL_TOLERANCE
    report = {"prompts": len(prompts), "positions": len(prompts) if classifier else int(mask.sum()), "output_dtype": out_dtype, "device": str(device),
              "merge": merged, "rounding_floor": floor,
              "thresholds": {f"max_{gated}": bound, "kl_factor": KL_FACTOR, **(
                  {"score_tolerance": SCORE_TOLERANCE} if classifier else {"kl_tolerance": KL_TOLERANCE})}}
    if blocks:
        report["blocks"] = blocks
        if settings is not None:
            report["naive_skipped"] = "checked block by block: the naive merge is shown by the whole-model check only"
    elif settings is not None and params > NAIVE_MAX_PARAMS:
        report["naive_skipped"] = (f"{params / 1e9:.1f}B parameters: the naive merge is shown up to "
                                   f"{NAIVE_MAX_PARAMS / 1e9:.0f}B (it loads the model once more)")
    elif settings is not None:
        from peft import PeftModel

        auto = model_class(merged_config)
        head = {"num_labels": merged_config.num_labels, "pad_token_id": merged_config.pad_token_id} if classifier else {}
        with library_deprecations():
            naive = PeftModel.from_pretrained(auto.from_pretrained(
                base_folder, dtype=getattr(torch, out_dtype), device_map={"": device}, **head),
                adapter_dir).merge_and_unload().float()
        report["naive_merge_into_16bit_base"] = compare(reference, logits(naive))
        del naive
        gc.collect()
    failed = [] if merged[gated] <= bound else [  # a NaN fails too
        f"{'max relative score difference' if classifier else 'mean KL'} {merged[gated]:.2e} > {bound:.2e} = "
        f"{KL_FACTOR:g} x the {out_dtype} rounding floor {floor[gated]:.2e} + "
        f"{SCORE_TOLERANCE if classifier else KL_TOLERANCE:.0e}"]
    report.update(passed=not failed, failures=failed)
    return report


def _whole_model(adapter_dir, merged_dir, base_folder, settings, out_dtype, merged_config, device, logits) -> tuple:
    """The reference, floor and merge figures with each model loaded whole, one at a time, on `device`; and the
    reference's parameter count."""
    import gc

    import torch
    from peft import PeftModel

    auto = model_class(merged_config)
    head = {"num_labels": merged_config.num_labels, "pad_token_id": merged_config.pad_token_id} if (
        is_classifier_config(merged_config)) else {}
    place = {"device_map": {"": device}}  # one device for all three models and the batch
    backend = None if settings is None else backend_named(settings.get("quant_backend") or "bnb_4bit")
    if settings is None:  # trained on a 16-bit base: the reference is the adapter on it
        base = auto.from_pretrained(base_folder, dtype=torch.float32, **place, **head)
    else:
        dtype = getattr(torch, settings.get("weight_dtype") or "float32")
        base = auto.from_pretrained(base_folder, dtype=dtype, **place, **head,
                                    quantization_config=backend.reference_config(settings))
        base = make_cpu_inference_safe(base)
        for name, param in base.named_parameters():
            if param.dtype in (torch.float16, torch.bfloat16):  # the rest as the merge wrote it, in float32
                param.data = param.data.float()
    params = sum(p.numel() * (2 if p.dtype == torch.uint8 else 1) for p in base.parameters())  # packed 4-bit: 2/byte
    layers = backend.quantized_layers(base) if backend else []
    rounding_floor.exact_four_bit(base, layers, backend.dequantize if backend else None)
    with library_deprecations():  # peft reads transformers' deprecated `is_gradient_checkpointing`
        trained = PeftModel.from_pretrained(base, adapter_dir).float()
    reference = logits(trained)
    rounding_floor.add_rounding_error(trained, layers, out_dtype, FLOOR_SEED)
    floor = compare(reference, logits(trained))
    del base, trained, layers
    gc.collect()  # one model in memory at a time: the reference, the merge, then the naive merge
    merged = compare(reference, logits(auto.from_pretrained(merged_dir, dtype=torch.float32, **place)))
    gc.collect()
    return reference, floor, merged, params


def format_table(report: dict) -> str:
    rows = [("merge (this)", report["merge"]), (f"{report['output_dtype']} rounding floor", report["rounding_floor"])]
    if "naive_merge_into_16bit_base" in report:
        rows.append(("naive merge, 16-bit base", report["naive_merge_into_16bit_base"]))
    lines = [f"fidelity against the adapter on its trained base ({report['prompts']} prompts, "
             f"{report['positions']} positions):",
             f"  {'':26} {'mean KL':>10} {'max rel. logit diff':>20} {'greedy agree':>13}"]
    for name, figures in rows:
        lines.append(f"  {name:26} {figures['mean_kl']:>10.2e} {figures['max_relative_logit_diff']:>20.2e} "
                     f"{figures['greedy_agreement']:>13.1%}")
    if "naive_skipped" in report:
        lines.append(f"  naive merge not shown: {report['naive_skipped']}")
    if "blocks" in report:
        lines.append(f"  {report['blocks']}")
    gated = "mean_kl" if "max_mean_kl" in report["thresholds"] else "max_relative_logit_diff"
    verdict = (f"{'mean KL' if gated == 'mean_kl' else 'max relative score difference'} "
               f"{report['merge'][gated]:.2e} <= {report['thresholds'][f'max_{gated}']:.2e}")
    lines.append("  check: " + (f"passed ({verdict})" if report["passed"] else "FAILED: " + "; ".join(report["failures"])))
    return "\n".join(lines)


def write_report(folder: str, report: dict) -> str:
    path = os.path.join(folder, REPORT_FILE)
    write_json_atomic(path, report)
    return path
