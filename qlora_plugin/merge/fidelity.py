"""How faithful a merge is: the merged model against what was trained (the adapter on its 4-bit base).

Run by `qlora-plugin merge` on the written folder before it is put in place. On a handful of prompts it compares
the logits of the merged model with the reference, the adapter loaded by peft on the base rebuilt as training
held it (the recorded quantization, bitsandbytes' generic dequantize-then-matmul path); and, for a 4-bit base,
peft's usual merge of the same adapter into the original 16-bit weights, to show what the quantization-aware
merge avoids. Figures: the largest logit difference relative to the largest reference logit, the mean KL
divergence of the next-token distributions (reference || merged), and the share of positions where the greedy
token agrees.
"""

from __future__ import annotations

import json
import math
import os
import types

from qlora_plugin.errors import QLoRAPluginError
from qlora_plugin.files import write_json_atomic
from qlora_plugin.merge.classifier import is_classifier_config, model_class
from qlora_plugin.notices import library_deprecations
from qlora_plugin.quant.cpu_guard import make_cpu_inference_safe
from qlora_plugin.quant.layers import four_bit_layers

REPORT_FILE = "merge_report.json"
# A merge passes when, against the reference: max relative logit difference <= the bound for the output dtype
# (float32 keeps the merged weights as computed; 16-bit output rounds every weight, ~2^-8 relative for bf16),
# and greedy tokens agree at >= MIN_AGREEMENT of the positions (ties between near-equal logits may flip).
MAX_RELATIVE_DIFF = {"float32": 1e-3, "float16": 2e-2, "bfloat16": 1e-1}
MIN_AGREEMENT = 0.95
DEFAULT_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Question: What is 12 times 7?\nAnswer:",
    "Once upon a time, in a small village by the sea,",
    "Translate to German: Good morning, how are you?",
    "The three laws of thermodynamics are",
)


def load_prompts(path: str | None, limit: int = 8) -> list[str]:
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


def _exact_forward(self, x):
    """A 4-bit layer as exact float32 arithmetic on bitsandbytes' own dequantized weight: bitsandbytes' CPU kernels
    round through bf16 on some CPUs, and the check is about the merged weights, not about a kernel's rounding."""
    import bitsandbytes.functional as bnbf
    import torch

    weight = bnbf.dequantize_4bit(self.weight.data, self.weight.quant_state).float()
    bias = None if self.bias is None else self.bias.float()
    return torch.nn.functional.linear(x.float(), weight, bias).to(x.dtype)


def compare(reference, logits) -> dict:
    """The three figures for two [positions, vocab] logit tensors."""
    import torch

    reference, logits = reference.float(), logits.float()
    kl = torch.nn.functional.kl_div(logits.log_softmax(-1), reference.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1)
    return {
        "max_relative_logit_diff": ((logits - reference).abs().max() / reference.abs().max()).item(),
        "mean_kl": max(kl.mean().item(), 0.0),  # float rounding can make a zero KL slightly negative
        "greedy_agreement": (logits.argmax(-1) == reference.argmax(-1)).float().mean().item(),
    }


def check(adapter_dir: str, merged_dir: str, base_folder: str, settings: dict | None, out_dtype: str,
          eval_data: str | None = None) -> dict:
    """The fidelity report for a merged folder: figures for the merge and (4-bit base) the naive merge, the
    thresholds, and whether it passed."""
    import gc

    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoTokenizer, BitsAndBytesConfig

    merged_config = AutoConfig.from_pretrained(merged_dir)
    auto = model_class(merged_config)  # a causal LM, or a reward model's classifier (`merge.classifier`)
    classifier = is_classifier_config(merged_config)
    head = {"num_labels": merged_config.num_labels, "pad_token_id": merged_config.pad_token_id} if classifier else {}
    prompts = load_prompts(eval_data)
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    mask = batch["attention_mask"].bool()

    def logits(model):
        with torch.no_grad():
            out = model.eval()(**batch).logits  # a classifier: one row of scores per prompt
            return (out if classifier else out[mask]).float()

    if settings is None:  # trained on a 16-bit base: the reference is the adapter on it
        base = auto.from_pretrained(base_folder, dtype=torch.float32, **head)
    else:
        dtype = getattr(torch, settings.get("weight_dtype") or "float32")
        base = auto.from_pretrained(base_folder, dtype=dtype, **head, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=settings["bnb_4bit_quant_type"],
            bnb_4bit_use_double_quant=settings["bnb_4bit_use_double_quant"], bnb_4bit_compute_dtype=torch.float32))
        base = make_cpu_inference_safe(base)
        for name, param in base.named_parameters():
            if param.dtype in (torch.float16, torch.bfloat16):  # the rest as the merge wrote it, in float32
                param.data = param.data.float()
        for layer in four_bit_layers(base):
            layer.forward = types.MethodType(_exact_forward, layer)
    with library_deprecations():  # peft reads transformers' deprecated `is_gradient_checkpointing`
        reference = logits(PeftModel.from_pretrained(base, adapter_dir).float())
    del base
    gc.collect()  # one model in memory at a time: the reference, the merge, then the naive merge
    output = getattr(torch, out_dtype)
    merged = compare(reference, logits(auto.from_pretrained(merged_dir, dtype=output)))
    gc.collect()
    report = {"prompts": len(prompts), "positions": len(prompts) if classifier else int(mask.sum()),
              "output_dtype": out_dtype, "merge": merged,
              "thresholds": {"max_relative_logit_diff": MAX_RELATIVE_DIFF[out_dtype],
                             "min_greedy_agreement": MIN_AGREEMENT}}
    if settings is not None:
        with library_deprecations():
            naive = PeftModel.from_pretrained(auto.from_pretrained(base_folder, dtype=output, **head),
                                              adapter_dir).merge_and_unload()
        report["naive_merge_into_16bit_base"] = compare(reference, logits(naive))
        del naive
        gc.collect()
    failed = [f"max relative logit difference {merged['max_relative_logit_diff']:.2e} > "
              f"{MAX_RELATIVE_DIFF[out_dtype]:.0e}"] if merged["max_relative_logit_diff"] > MAX_RELATIVE_DIFF[out_dtype] \
        else []
    if merged["greedy_agreement"] < MIN_AGREEMENT or math.isnan(merged["mean_kl"]):
        failed.append(f"greedy agreement {merged['greedy_agreement']:.1%} < {MIN_AGREEMENT:.0%}")
    report.update(passed=not failed, failures=failed)
    return report


def format_table(report: dict) -> str:
    rows = [("merge (this)", report["merge"])]
    if "naive_merge_into_16bit_base" in report:
        rows.append(("naive merge, 16-bit base", report["naive_merge_into_16bit_base"]))
    lines = [f"fidelity against the adapter on its trained base ({report['prompts']} prompts, "
             f"{report['positions']} positions):",
             f"  {'':26} {'max rel. logit diff':>20} {'mean KL':>10} {'greedy agree':>13}"]
    for name, figures in rows:
        lines.append(f"  {name:26} {figures['max_relative_logit_diff']:>20.2e} {figures['mean_kl']:>10.2e} "
                     f"{figures['greedy_agreement']:>13.1%}")
    lines.append("  check: " + ("passed" if report["passed"] else "FAILED: " + "; ".join(report["failures"])))
    return "\n".join(lines)


def write_report(folder: str, report: dict) -> str:
    path = os.path.join(folder, REPORT_FILE)
    write_json_atomic(path, report)
    return path
