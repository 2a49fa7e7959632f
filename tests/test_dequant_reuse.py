"""`reuse_dequantized_weights`: one dequantization fewer per 4-bit layer per checkpointed step, same results.

The claim is bit-identity with bitsandbytes' own path, so every comparison here is `torch.equal`, not a tolerance.
"""

from __future__ import annotations

import pytest
import torch
from datasets import load_dataset

from conftest import DATA
from qlora_plugin.core.options import StrategyOptions


def _trainer(model_path, out, options: dict, gradient_checkpointing: bool = True):
    from trl import SFTConfig

    from qlora_plugin import make_trainer

    args = SFTConfig(output_dir=str(out), max_steps=3, per_device_train_batch_size=4, report_to="none",
                     use_cpu=True, logging_steps=1, save_strategy="no", max_length=64, seed=0,
                     gradient_checkpointing=gradient_checkpointing, learning_rate=1e-3)
    return make_trainer("qlora", model=model_path, args=args, train_dataset=load_dataset(str(DATA))["train"],
                        options=options)


def _adapter(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def _dequantize_calls(fn) -> int:
    """How many times bitsandbytes' dequantize_4bit kernel runs inside `fn()`."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "bitsandbytes::dequantize_4bit")


def _one_backward(trainer):
    model = trainer.model
    model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    model.zero_grad(set_to_none=True)
    loss = model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["llama", "phi3"])
@pytest.mark.slow
def test_training_is_bit_identical_to_bitsandbytes_path(tiny_models, tmp_path, arch):
    variants = {"bitsandbytes": {"cpu_dequant_buffer": False}, "reuse": {"reuse_dequantized_weights": True}}
    runs = {}
    for name, options in variants.items():
        trainer = _trainer(tiny_models[arch], tmp_path / name, options)
        trainer.train()
        runs[name] = ([log["loss"] for log in trainer.state.log_history if "loss" in log], _adapter(trainer))
    losses, adapter = runs.pop("bitsandbytes")
    assert len(losses) == 3
    for name, (other_losses, other_adapter) in runs.items():
        assert other_losses == losses, name
        assert other_adapter.keys() == adapter.keys()
        assert all(torch.equal(other_adapter[n], adapter[n]) for n in adapter), name


@pytest.mark.slow
def test_reuse_removes_one_dequantization_per_layer(tiny_models, tmp_path):
    from qlora_plugin.quant.layers import four_bit_layers

    results = {}
    for reuse in (False, True):
        trainer = _trainer(tiny_models["llama"], tmp_path / str(reuse), {"reuse_dequantized_weights": reuse})
        trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        layers = len(four_bit_layers(trainer.model))
        holder = {}
        calls = _dequantize_calls(lambda: holder.update(result=_one_backward(trainer)))
        results[reuse] = (calls, holder["result"])
    assert results[False][0] == 3 * layers  # forward, recomputation, backward
    assert results[True][0] == 2 * layers  # the backward uses the recomputation's
    (loss_off, grads_off), (loss_on, grads_on) = results[False][1], results[True][1]
    assert torch.equal(loss_on, loss_off)
    assert grads_on.keys() == grads_off.keys() and grads_off
    assert all(torch.equal(grads_on[n], grads_off[n]) for n in grads_off)


@pytest.mark.slow
def test_without_checkpointing_reuse_keeps_bitsandbytes_path(tiny_models, tmp_path):
    """Outside a checkpointed block nothing is kept (no dequantized copy of every layer waiting for the backward):
    the layers dequantize exactly as often as bitsandbytes' own path does."""
    calls = {}
    for reuse in (False, True):
        trainer = _trainer(tiny_models["llama"], tmp_path / str(reuse), {"reuse_dequantized_weights": reuse},
                           gradient_checkpointing=False)
        trainer.model.gradient_checkpointing_disable()
        calls[reuse] = _dequantize_calls(lambda: _one_backward(trainer))
    assert calls[True] == calls[False] > 0


@pytest.mark.slow
def test_option_installs_on_the_blocks_4bit_layers_only_when_asked(tiny_models, tmp_path):
    from bitsandbytes.nn import Linear4bit

    for reuse in (False, True):
        trainer = _trainer(tiny_models["llama"], tmp_path / str(reuse), {"reuse_dequantized_weights": reuse})
        layers = [m for m in trainer.model.modules() if isinstance(m, Linear4bit)]
        marked = [m for m in layers if hasattr(m, "_qlora_checkpointed_block")]
        assert layers and len(marked) == (len(layers) if reuse else 0)
        assert all(m._qlora_checkpointed_block() is not None and "forward" in vars(m) for m in marked)


def test_reuse_is_cpu_only_and_says_so_elsewhere(tiny_models):
    """Measured on CPU only; on a GPU it would hold a block's dequantized weights in GPU memory. The hook gets a
    faked CUDA runtime (the model stays on the CPU): nothing is installed, and the summary says why."""
    from trl.trainer.utils import create_model_from_path

    from qlora_plugin.cpu import dequant_reuse
    from qlora_plugin.cpu.linear4bit_forward import routed
    from qlora_plugin.plugin.manager import get_plugin_manager
    from qlora_plugin.quant.config import model_init_kwargs
    from qlora_plugin.quant.layers import four_bit_layers
    from qlora_plugin.ecosystem.runtime import Runtime
    from qlora_plugin.strategies.builtin import QLORA

    pm = get_plugin_manager()
    options = StrategyOptions(reuse_dequantized_weights=True)
    cpu = Runtime("cpu", False, "none")
    for runtime, installed in ((cpu, True), (Runtime("cuda", True, "none", capability=(8, 0)), False)):
        model = create_model_from_path(tiny_models["llama"], **model_init_kwargs(options, {}, cpu))
        wrapped = pm.hook.qlora_wrap_model(strategy=QLORA, options=options, model=model, runtime=runtime)
        assert all(routed(layer) is installed for layer in four_bit_layers(wrapped))
    assert "CPU only" in dequant_reuse.inactive_note(options, True, "cuda")
    assert dequant_reuse.inactive_note(options, True, "cpu") is None
