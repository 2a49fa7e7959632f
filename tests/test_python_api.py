"""The Python API in-process: apply_strategy / make_trainer, learning, and reloading the adapter with plain peft."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import load_dataset

from conftest import DATA


def sft_config(out, **overrides):
    from trl import SFTConfig

    values = dict(output_dir=str(out), max_steps=3, per_device_train_batch_size=8, report_to="none", use_cpu=True,
                  logging_steps=1, save_strategy="no", max_length=64)
    values.update(overrides)
    return SFTConfig(**values)


def train_split():
    return load_dataset(str(DATA))["train"]


@pytest.mark.slow
def test_apply_strategy_returns_plain_sfttrainer_kwargs(tiny_models, tmp_path):
    from trl import SFTTrainer

    from qlora_plugin import apply_strategy

    kwargs = apply_strategy({"model": tiny_models["llama"], "args": sft_config(tmp_path, learning_rate=3e-3),
                             "train_dataset": train_split()}, "qlora", options={"lora_r": 8})
    model = kwargs["model"]
    assert model.peft_config["default"].r == 8
    assert getattr(model, "is_loaded_in_4bit", False)
    assert kwargs["args"].learning_rate == 3e-3  # set in Python: the user's choice is kept
    assert kwargs["args"].max_grad_norm == 0.3  # left at its default: the recipe's
    assert kwargs["optimizer_cls_and_kwargs"][0].__name__ == "PagedAdamW32bit"
    trainer = SFTTrainer(**kwargs)
    trainer.train()
    assert json.loads((tmp_path / "qlora_plugin_report.json").read_text())["source"] == "api"


@pytest.mark.slow
def test_lora_strategy_is_16bit(tiny_models, tmp_path):
    from qlora_plugin import make_trainer

    trainer = make_trainer("lora", model=tiny_models["llama"], args=sft_config(tmp_path), train_dataset=train_split())
    assert not getattr(trainer.model, "is_loaded_in_4bit", False)
    assert trainer.model.peft_config["default"].r == 64


@pytest.mark.slow
def test_user_peft_config_wins(tiny_models, tmp_path):
    from peft import LoraConfig

    from qlora_plugin import make_trainer

    trainer = make_trainer("qlora", model=tiny_models["llama"], args=sft_config(tmp_path),
                           train_dataset=train_split(), peft_config=LoraConfig(r=3, target_modules=["q_proj"]))
    assert trainer.model.peft_config["default"].r == 3
    assert getattr(trainer.model, "is_loaded_in_4bit", False)


@pytest.mark.slow
def test_loss_falls_clearly_with_qlora(tiny_models, tmp_path):
    """The bundled skills dataset is learnable: 60 qlora steps cut the loss by over a quarter."""
    from qlora_plugin import make_trainer

    trainer = make_trainer("qlora", model=tiny_models["llama"], train_dataset=train_split(),
                           args=sft_config(tmp_path, max_steps=60, learning_rate=3e-3, logging_steps=5))
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses[-1] < 0.75 * losses[0], losses


@pytest.mark.slow
@pytest.mark.floor
def test_saved_adapter_reloads_with_plain_peft(tiny_models, tmp_path):
    """The adapter saved after training loads with plain peft on a 4-bit base and reproduces the outputs."""
    from peft import PeftModel, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qlora_plugin import make_cpu_inference_safe, make_trainer
    from qlora_plugin.strategies.adapters import embeddings_kept

    trainer = make_trainer("qlora", model=tiny_models["llama_odd"], train_dataset=train_split(),
                           args=sft_config(tmp_path, max_steps=10, learning_rate=3e-3))
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    inputs = torch.tensor([[1, 20, 30, 40, 50, 60]])
    trained = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False).eval()
    with torch.no_grad():
        expected = trained(input_ids=inputs).logits.float()

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=trained.base_model.model.model.layers[0].self_attn.q_proj
                               .base_layer.compute_dtype)
    # Quantized from the weights in the dtype training loaded them in (the quant record says which: bf16 where the
    # CPU has it natively), then prepared for k-bit training as the strategy does (the rest upcast to fp32 but the
    # embeddings and head, which stay in the loaded dtype).
    record = json.loads((tmp_path / "qlora_plugin_quantization.json").read_text())  # output_dir, at train end
    base = AutoModelForCausalLM.from_pretrained(tiny_models["llama_odd"], quantization_config=quant,
                                                dtype=getattr(torch, record["weight_dtype"]))
    with embeddings_kept(base):
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    reloaded = make_cpu_inference_safe(PeftModel.from_pretrained(base, str(tmp_path / "adapter"))).eval()
    adapter_dtype = next(p.dtype for n, p in trained.named_parameters() if "lora_A" in n)
    assert adapter_dtype == quant.bnb_4bit_compute_dtype  # adapters train in the compute dtype
    for name, param in reloaded.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(adapter_dtype)  # peft loads adapters in fp32 by default
    with torch.no_grad():
        got = reloaded(input_ids=inputs).logits.float()
    assert torch.allclose(got, expected, atol=2e-2, rtol=0), (got - expected).abs().max()
    with reloaded.disable_adapter(), torch.no_grad():
        base_only = reloaded(input_ids=inputs).logits.float()
    assert (base_only - expected).abs().max() > 10 * (got - expected).abs().max()  # the adapter matters
    out = reloaded.generate(input_ids=inputs, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 10)


def test_already_loaded_16bit_model_is_refused(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    from qlora_plugin import QLoRAPluginError, apply_strategy

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    with pytest.raises(QLoRAPluginError, match="16-bit model object the plugin did not load"):
        apply_strategy({"model": model, "args": sft_config(tmp_path), "train_dataset": train_split()}, "qlora")


@pytest.mark.slow
def test_user_quantization_config_wins(tiny_models, tmp_path):
    from transformers import BitsAndBytesConfig

    from qlora_plugin import make_trainer

    trainer = make_trainer("qlora", model=tiny_models["llama"], args=sft_config(tmp_path), train_dataset=train_split(),
                           quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4"))
    layer = trainer.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert layer.weight.quant_state.quant_type == "fp4"


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.slow
def test_autocast_follows_the_recipe_bf16(tiny_models, tmp_path, monkeypatch, native):
    """TRL asks for bf16; without native bf16 the strategy turns it off, and the Accelerator's autocast with it
    (transformers derives `mixed_precision` at config time: a stale "bf16" ran every matmul emulated, 5x slower)."""
    from qlora_plugin import make_trainer
    from qlora_plugin.ecosystem import runtime

    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
    trainer = make_trainer("qlora", model=tiny_models["llama"], args=sft_config(tmp_path),
                           train_dataset=train_split())
    assert trainer.args.bf16 is native
    assert trainer.accelerator.mixed_precision == ("bf16" if native else "no")
