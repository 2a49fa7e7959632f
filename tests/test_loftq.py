"""`init_lora_weights`: the LoftQ start cancels the 4-bit quantization error it can, deterministically, on every
adapted layer kind; `auto` picks it only where it can run; an explicit loftq where it cannot is refused."""

from __future__ import annotations

import pytest
import torch

from qlora_plugin.errors import QLoRAPluginError
from qlora_plugin.options import StrategyOptions
from qlora_plugin.runtime import Runtime
from qlora_plugin.strategies.adapters import lora_init, wrap_with_lora
from qlora_plugin.strategies.loftq import PEFT_PREFIX, SafetensorsWeights

CPU = Runtime("cpu", False, "none")


def _four_bit(path: str):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.float32)


def _layer_errors(model, path: str) -> list[tuple[str, float, float]]:
    """(layer, |(Q + s·BA) - W|, |Q - W|) of every 4-bit LoRA layer, on the same random inputs."""
    import bitsandbytes as bnb
    from peft.tuners.lora import Linear4bit

    weights = SafetensorsWeights(path)
    prefix = model.get_base_model().base_model_prefix
    model.eval()
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, Linear4bit):
            continue
        packed = module.get_base_layer().weight
        quantized = bnb.functional.dequantize_4bit(packed.data, packed.quant_state).float()
        original = weights.get(name[len(PEFT_PREFIX):] + ".weight", prefix).float()
        if original.shape != quantized.shape:
            original = original.T
        x = torch.randn(16, quantized.shape[1], generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            adapted = module(x).float()
        target = x @ original.T
        out.append((name, float((adapted - target).norm()), float((x @ quantized.T - target).norm())))
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: Conv1D layers, stored transposed in the checkpoint
def test_loftq_start_brings_every_layer_closer_to_16_bit(tiny_models, arch):
    model = wrap_with_lora(_four_bit(tiny_models[arch]), StrategyOptions(init_lora_weights="loftq", lora_r=8), CPU)
    facts = model.qlora_lora_init
    assert facts["method"] == "loftq" and facts["layers"] > 0 and 0.0 < facts["error_cancelled"] < 1.0
    errors = _layer_errors(model, tiny_models[arch])
    assert len(errors) == facts["layers"]
    for name, with_adapter, without in errors:
        assert with_adapter < without, (name, with_adapter, without)


def test_loftq_at_full_rank_restores_the_16_bit_model(tiny_models):
    """Rank 64 on 64-wide layers: the whole quantization error is representable, so the 4-bit model with its
    adapters computes what the 16-bit model computes -- the scaling (alpha / r) included."""
    from transformers import AutoModelForCausalLM

    path = tiny_models["llama"]
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    plain = wrap_with_lora(_four_bit(path), StrategyOptions(init_lora_weights="default"), CPU).eval()
    loftq = wrap_with_lora(_four_bit(path), StrategyOptions(init_lora_weights="loftq"), CPU).eval()
    assert loftq.qlora_lora_init["error_cancelled"] > 0.999
    with torch.no_grad():
        want = reference(ids).logits
        plain_gap = (plain(ids).logits - want).abs().max()
        loftq_gap = (loftq(ids).logits - want).abs().max()
    assert loftq_gap < plain_gap / 20, (loftq_gap, plain_gap)


def test_loftq_is_deterministic_and_leaves_the_random_state_alone(tiny_models):
    path = tiny_models["llama"]
    options = StrategyOptions(init_lora_weights="loftq", lora_r=4)
    torch.manual_seed(123)
    first = wrap_with_lora(_four_bit(path), options, CPU)
    after_first = torch.rand(3)
    torch.manual_seed(123)
    second = wrap_with_lora(_four_bit(path), options, CPU)
    assert torch.equal(torch.rand(3), after_first)  # the SVD's own seed did not move the user's generator
    a = {n: p for n, p in first.named_parameters() if "lora_" in n}
    b = {n: p for n, p in second.named_parameters() if "lora_" in n}
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_auto_is_loftq_only_where_it_can_run():
    assert lora_init(StrategyOptions(), four_bit=True, shards_parameters=False) == "loftq"
    assert lora_init(StrategyOptions(), four_bit=False, shards_parameters=False) == "default"
    assert lora_init(StrategyOptions(use_dora=True), four_bit=True, shards_parameters=False) == "default"
    assert lora_init(StrategyOptions(), four_bit=True, shards_parameters=True) == "default"
    assert lora_init(StrategyOptions(init_lora_weights="gaussian"), True, False) == "gaussian"


@pytest.mark.parametrize("options, four_bit, shards, reason", [
    (StrategyOptions(init_lora_weights="loftq"), False, False, "base is 16-bit"),
    (StrategyOptions(init_lora_weights="loftq", use_dora=True), True, False, "DoRA"),
    (StrategyOptions(init_lora_weights="loftq"), True, True, "FSDP"),
])
def test_explicit_loftq_where_it_cannot_run_is_refused(options, four_bit, shards, reason):
    with pytest.raises(QLoRAPluginError, match=reason) as err:
        lora_init(options, four_bit, shards)
    assert "--init_lora_weights default" in str(err.value)


def test_unknown_init_is_refused_with_the_choices():
    with pytest.raises(QLoRAPluginError, match="auto, loftq, default, gaussian"):
        StrategyOptions(init_lora_weights="pissa")


def test_base_without_safetensors_says_what_to_do(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(QLoRAPluginError, match="has none .*save_pretrained.*--init_lora_weights default"):
        SafetensorsWeights(str(tmp_path))


def test_a_hub_model_not_on_disk_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(QLoRAPluginError, match="not in the Hugging Face cache.*hf download"):
        SafetensorsWeights("some-org/not-downloaded-model")


def test_auto_falls_back_to_peft_start_and_says_why_explicit_loftq_refuses(tiny_models, tmp_path, caplog):
    """auto is our choice, so a base whose 16-bit weights cannot be read trains from peft's start, saying why;
    the same base with an explicit loftq stops with the reason, and no adapter was touched."""
    model = _four_bit(tiny_models["llama"])
    model.config._name_or_path = str(tmp_path)  # a folder without safetensors
    wrapped = wrap_with_lora(model, StrategyOptions(), CPU)
    assert wrapped.qlora_lora_init["method"] == "default"
    assert "has none" in wrapped.qlora_lora_init["note"] and "starting from peft's default" in caplog.text
    assert all(float(p.abs().sum()) == 0 for n, p in wrapped.named_parameters() if "lora_B" in n)

    model = _four_bit(tiny_models["llama"])
    model.config._name_or_path = str(tmp_path)
    with pytest.raises(QLoRAPluginError, match="has none"):
        wrap_with_lora(model, StrategyOptions(init_lora_weights="loftq"), CPU)


def test_plan_shows_the_start_and_plans_16_bit_beside_it_with_peft_start(tiny_models, capsys):
    from qlora_plugin.cli import main

    assert main(["plan", tiny_models["llama"], "--init_lora_weights", "loftq"]) == 0
    out = capsys.readouterr().out
    assert "qlora: compute" in out and "LoRA init loftq" in out.split("qlora: compute")[1].split("\n")[0]
    assert "LoRA init default" in out.split("lora: compute")[-1].split("\n")[0]
    assert main(["plan", tiny_models["llama"]]) == 0  # auto: the same choice as a training run
    assert "LoRA init loftq" in capsys.readouterr().out.split("qlora: compute")[1].split("\n")[0]
