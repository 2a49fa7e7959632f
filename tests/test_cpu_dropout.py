"""`cpu_fast_dropout`: LoRA dropout masks drawn with one 32-bit draw per element on CPU.

The claims: the drop rate is `p`, kept values are scaled by 1 / (1 - p) exactly as torch scales them, the
backward applies the same mask, the same seed gives the same masks (gradient checkpointing's recomputation
included), and the strategy installs it on CPU runs unless told not to.
"""

from __future__ import annotations

import math

import pytest
import torch
from datasets import load_dataset
from torch import nn

from conftest import DATA
from qlora_plugin.cpu.cpu_dropout import CpuLoraDropout, inactive_note, install, installed, keep_mask


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_drop_rate_is_p(p):
    torch.manual_seed(0)
    count = 4_000_000
    dropped = (~keep_mask(torch.Size([count]), p)).sum().item() / count
    sigma = math.sqrt(p * (1 - p) / count)
    assert abs(dropped - p) < 5 * sigma, (dropped, p)


def test_mask_has_the_input_shape_and_no_pattern_across_its_halves():
    torch.manual_seed(0)
    mask = keep_mask(torch.Size([3, 5, 7]), 0.5)
    assert mask.dtype == torch.bool and mask.shape == (3, 5, 7)
    big = keep_mask(torch.Size([2, 1_000_000]), 0.5).float()
    # Both 32-bit halves of each 64-bit draw are used: neighbouring elements must be independent.
    agreement = (big[:, ::2] == big[:, 1::2]).float().mean().item()
    assert abs(agreement - 0.5) < 5 * math.sqrt(0.25 / 1_000_000)


def test_kept_values_scaled_as_torch_scales_them_dropped_are_zero():
    torch.manual_seed(0)
    x = torch.randn(64, 256)
    out = CpuLoraDropout(0.1).train()(x)
    kept = out != 0
    assert torch.equal(out[kept], x[kept] * (1 / (1 - 0.1)))
    native = nn.functional.dropout(x, 0.1, training=True)
    native_kept = native != 0
    assert torch.equal(native[native_kept], x[native_kept] * (1 / (1 - 0.1)))  # the same scaling as torch's


def test_backward_applies_the_forward_mask_and_scale():
    torch.manual_seed(1)
    x = torch.randn(32, 128, dtype=torch.float64, requires_grad=True)
    out = CpuLoraDropout(0.3).train()(x)
    grad = torch.randn_like(out)
    out.backward(grad)
    kept = out.detach() != 0
    assert 0 < kept.sum() < kept.numel()
    assert torch.equal(x.grad, torch.where(kept, grad * (1 / (1 - 0.3)), 0.0))


def test_gradcheck_with_a_fixed_mask():
    def dropped(x):
        torch.manual_seed(2)  # the same mask at every evaluation
        return CpuLoraDropout(0.25).train()(x)

    x = torch.randn(6, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(dropped, (x,))


def test_backward_keeps_a_bool_mask_not_a_float_one():
    saved = []
    x = torch.randn(16, 64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t):
        CpuLoraDropout(0.1).train()(x).sum().backward()
    assert saved == [torch.bool]


def test_same_seed_same_mask_other_seed_other_mask():
    x = torch.ones(128, 128)
    layer = CpuLoraDropout(0.1).train()
    torch.manual_seed(5)
    first = layer(x)
    torch.manual_seed(5)
    again = layer(x)
    torch.manual_seed(6)
    other = layer(x)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_torch_path_outside_cpu_training():
    x = torch.randn(8, 8)
    assert torch.equal(CpuLoraDropout(0.1).eval()(x), x)
    assert torch.equal(CpuLoraDropout(0.0).train()(x), x)
    assert torch.equal(CpuLoraDropout(1.0).train()(x), torch.zeros_like(x))
    meta = CpuLoraDropout(0.1).train()(torch.empty(4, 4, device="meta"))  # another device: torch's dropout
    assert meta.device.type == "meta"
    ints = torch.arange(6)
    with pytest.raises(RuntimeError):  # torch's own error for integer input, not a silent cast
        CpuLoraDropout(0.1).train()(ints)


def _lora_model(path, dropout=0.1):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear",
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def test_install_swaps_every_lora_dropout_and_nothing_else(tiny_models):
    model = _lora_model(tiny_models["llama"]).train()
    lora_layers = sum(1 for name, _ in model.named_modules() if name.endswith(".lora_A"))
    before = {name for name, m in model.named_modules() if isinstance(m, nn.Dropout)}
    state = set(model.state_dict())
    assert install(model) == lora_layers > 0
    assert installed(model) == lora_layers
    swapped = {name for name, m in model.named_modules() if isinstance(m, CpuLoraDropout)}
    assert swapped == {name for name in before if ".lora_dropout." in name}
    assert all(m.p == 0.1 and m.training for m in model.modules() if isinstance(m, CpuLoraDropout))
    assert set(model.state_dict()) == state  # no parameter or buffer added: saved adapters are unchanged
    assert install(model) == 0  # already swapped
    assert install(_lora_model(tiny_models["llama"], dropout=0.0)) == 0  # peft uses nn.Identity at p=0


def _loss_and_grads(model, checkpointing: bool):
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    else:
        model.gradient_checkpointing_disable()
    model.train()
    model.zero_grad(set_to_none=True)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(123)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.slow
def test_checkpointing_recomputes_the_same_masks(tiny_models):
    """The recomputation draws its masks again; it must draw the ones the forward used, or gradients are wrong."""
    model = _lora_model(tiny_models["llama"], dropout=0.5)
    install(model)
    loss, grads = _loss_and_grads(model, checkpointing=False)
    loss_ckpt, grads_ckpt = _loss_and_grads(model, checkpointing=True)
    assert torch.equal(loss, loss_ckpt)
    assert grads.keys() == grads_ckpt.keys() and grads
    for name in grads:
        assert torch.equal(grads[name], grads_ckpt[name]), name
    model.eval()
    with torch.no_grad():
        clean = model(input_ids=torch.ones(1, 4, dtype=torch.long)).logits
        assert torch.equal(clean, model(input_ids=torch.ones(1, 4, dtype=torch.long)).logits)  # eval: no dropout


def _strategy_kwargs(model_path, out, options):
    from trl import SFTConfig

    from qlora_plugin import apply_strategy

    args = SFTConfig(output_dir=str(out), max_steps=2, report_to="none", use_cpu=True, max_length=32,
                     per_device_train_batch_size=2, logging_steps=1, save_strategy="no", seed=0)
    return apply_strategy({"model": model_path, "args": args, "train_dataset": load_dataset(str(DATA))["train"]},
                          "qlora", options=options)


def _facts(kwargs) -> dict:
    return next(c for c in kwargs["callbacks"] if type(c).__name__ == "StrategyReportCallback").facts


@pytest.mark.slow
def test_strategy_installs_it_on_cpu_and_says_so(tiny_models, tmp_path, capsys):
    from qlora_plugin.training.report import format_summary

    kwargs = _strategy_kwargs(tiny_models["llama"], tmp_path, {})
    layers = sum(1 for name, _ in kwargs["model"].named_modules() if name.endswith(".lora_A"))
    facts = _facts(kwargs)
    assert facts["adapter"]["fast_dropout_layers"] == installed(kwargs["model"]) == layers > 0
    assert f"masks for {layers} LoRA layers drawn with one 32-bit draw" in format_summary(facts)

    off = _strategy_kwargs(tiny_models["llama"], tmp_path / "off", {"cpu_fast_dropout": False})
    assert installed(off["model"]) == 0
    assert _facts(off)["adapter"]["fast_dropout_layers"] == 0
    assert any(type(m) is nn.Dropout for m in off["model"].modules())
    assert "32-bit draw" not in format_summary(_facts(off))


@pytest.mark.slow
def test_training_runs_and_same_seed_repeats(tiny_models, tmp_path):
    from trl import SFTTrainer

    losses = []
    for run in ("first", "second"):
        trainer = SFTTrainer(**_strategy_kwargs(tiny_models["llama"], tmp_path / run, {"lora_dropout": 0.3}))
        trainer.train()
        losses.append([log["loss"] for log in trainer.state.log_history if "loss" in log])
    assert len(losses[0]) == 2 and all(math.isfinite(v) for v in losses[0])
    assert losses[0] == losses[1]


def test_asking_for_it_where_it_cannot_act_is_said(tiny_models, tmp_path):
    kwargs = _strategy_kwargs(tiny_models["llama"], tmp_path, {"cpu_fast_dropout": True, "lora_dropout": 0.0})
    assert any("lora_dropout is 0" in note for note in _facts(kwargs)["fallbacks"])
    assert inactive_note({"cpu_fast_dropout": True}, "cuda", 0.1, 0).startswith(
        "cpu_fast_dropout acts on CPU runs only; this run is on cuda")
    assert inactive_note({}, "cuda", 0.1, 0) is None  # the default asks for nothing: nothing to say
    assert inactive_note({"cpu_fast_dropout": True}, "cpu", 0.1, 12) is None
