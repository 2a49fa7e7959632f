"""Measure how faithful a merge is: logits of merged models against the 4-bit base + adapter that training used.

    qlora-plugin merge --adapter examples/output/qlora-demo --out examples/output/qlora-demo-merged
    python examples/merge_fidelity.py examples/output/qlora-demo examples/output/qlora-demo-merged

Prints the largest absolute logit difference on held-out prompts (examples/data/skills/test.jsonl) for
`qlora-plugin merge` and for the usual merge of the LoRA delta into the original 16-bit weights (peft's
`merge_and_unload` on the unquantized base), plus how far the adapter itself moves the logits.
"""

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(adapter: str, merged: str, limit: int = 32) -> int:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    record = json.loads((Path(adapter) / "qlora_plugin_quantization.json").read_text())
    base = json.loads((Path(adapter) / "adapter_config.json").read_text())["base_model_name_or_path"]
    rows = [json.loads(line) for line in (HERE / "data" / "skills" / "test.jsonl").read_text().splitlines()[:limit]]
    tokenizer = AutoTokenizer.from_pretrained(merged)
    batch = tokenizer([r["prompt"] + r["completion"] for r in rows], return_tensors="pt", padding=True)
    mask = batch["attention_mask"].bool()

    def logits(model):  # on the model's device (a 4-bit base loads onto the GPU where there is one)
        with torch.no_grad():
            out = model.eval()(**{k: v.to(model.device) for k, v in batch.items()}).logits
            return out.float().cpu()[mask]

    dtype = getattr(torch, record["weight_dtype"])
    quantized = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=record["bnb_4bit_quant_type"],
        bnb_4bit_use_double_quant=record["bnb_4bit_use_double_quant"], bnb_4bit_compute_dtype=torch.float32))
    trained = PeftModel.from_pretrained(quantized, adapter)
    reference = logits(trained)
    with trained.disable_adapter():
        adapter_effect = (logits(trained) - reference).abs().max().item()
    figures = {"held_out_tokens": int(mask.sum()), "logit_scale": round(reference.abs().max().item(), 3),
               "adapter_effect": adapter_effect}
    naive_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    for name, model in (("qlora_plugin_merge", AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)),
                        ("naive_merge", naive_model.merge_and_unload())):
        got = logits(model)
        figures[f"{name}_max_abs_logit_diff"] = (got - reference).abs().max().item()
        figures[f"{name}_top1_agreement"] = (got.argmax(-1) == reference.argmax(-1)).float().mean().item()
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:3]))
