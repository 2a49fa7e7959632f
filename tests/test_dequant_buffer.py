"""`cpu_dequant_buffer`: large CPU 4-bit weights dequantize into one reused buffer, with bit-identical results.

The tiny test models' weights are far below the 32 MiB at which the buffer starts to pay, so most tests lower
`MIN_BYTES` to send every layer through it; `torch.equal` throughout, never a tolerance.
"""

from __future__ import annotations

import json

import pytest
import torch
from datasets import load_dataset
from transformers import TrainerCallback

from conftest import DATA


def _trainer(model_path, out, options: dict, steps: int = 3, callbacks=()):
    from trl import SFTConfig

    from qlora_plugin import make_trainer

    args = SFTConfig(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, report_to="none",
                     use_cpu=True, logging_steps=1, save_strategy="no", max_length=64, seed=0,
                     gradient_checkpointing=True, learning_rate=1e-3)
    return make_trainer("qlora", model=model_path, args=args, train_dataset=load_dataset(str(DATA))["train"],
                        options=options, callbacks=list(callbacks))


def _op_calls(fn, op: str) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == op)


@pytest.mark.parametrize("arch", ["llama", "phi3"])
@pytest.mark.slow
def test_training_is_bit_identical_to_bitsandbytes_path(tiny_models, tmp_path, monkeypatch, arch):
    from qlora_plugin.cpu import dequant_buffer

    monkeypatch.setattr(dequant_buffer, "MIN_BYTES", 0)
    variants = {
        "bitsandbytes": {"cpu_dequant_buffer": False},
        "buffer": {"cpu_dequant_buffer": True},
        "buffer+reuse": {"cpu_dequant_buffer": True, "reuse_dequantized_weights": True},
    }
    runs = {}
    for name, options in variants.items():
        trainer = _trainer(tiny_models[arch], tmp_path / name.replace("+", "_"), options)
        gemm_calls = _op_calls(trainer.train, "bitsandbytes::gemm_4bit")
        losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
        adapter = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        runs[name] = (losses, adapter, gemm_calls)
    losses, adapter, gemm_calls = runs.pop("bitsandbytes")
    assert len(losses) == 3 and gemm_calls > 0
    for name, (other_losses, other_adapter, other_gemm_calls) in runs.items():
        assert other_gemm_calls == 0, name  # every training matmul took the buffered (or reuse) path
        assert other_losses == losses, name
        assert other_adapter.keys() == adapter.keys()
        assert all(torch.equal(other_adapter[n], adapter[n]) for n in adapter), name


@pytest.mark.parametrize("shape", [(96, 64), (50, 100), (7, 2048), (128, 6)])
@pytest.mark.parametrize("quant_type, nested, storage", [("nf4", True, torch.uint8), ("fp4", False, torch.uint8),
                                                         ("nf4", True, torch.bfloat16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_blocks_reassemble_bitsandbytes_dequantization(monkeypatch, shape, quant_type, nested, storage, dtype):
    import bitsandbytes.functional as bnbf

    from qlora_plugin.cpu import dequant_buffer

    monkeypatch.setattr(dequant_buffer, "_BLOCK_BYTES", 1024)  # many row blocks, and a ragged last one
    torch.manual_seed(0)
    weight = torch.randn(shape, dtype=dtype)
    packed, state = bnbf.quantize_4bit(weight, blocksize=64, quant_type=quant_type, compress_statistics=nested,
                                       quant_storage=storage)
    buffer = dequant_buffer.DequantBuffer()
    got = buffer.dequantize(packed, state, dtype)
    assert torch.equal(got, bnbf.dequantize_4bit(packed, state).to(dtype))
    # A smaller weight reuses the same memory: the buffer does not grow.
    small, small_state = bnbf.quantize_4bit(weight[: shape[0] // 2], blocksize=64, quant_type=quant_type,
                                            compress_statistics=nested, quant_storage=storage)
    size = buffer.nbytes()
    again = buffer.dequantize(small, small_state, dtype)
    assert torch.equal(again, bnbf.dequantize_4bit(small, small_state).to(dtype))
    assert buffer.nbytes() == size == weight.numel() * weight.element_size()
    assert again.data_ptr() == got.data_ptr()


@pytest.mark.slow
def test_buffer_holds_one_weight_and_only_large_layers_use_it(tiny_models, tmp_path, monkeypatch):
    from qlora_plugin.cpu import dequant_buffer
    from qlora_plugin.quant.layers import four_bit_layers

    trainer = _trainer(tiny_models["llama"], tmp_path / "default", {"cpu_dequant_buffer": True}, steps=1)
    layers = four_bit_layers(trainer.model)
    assert all(getattr(layer, "_qlora_dequant_buffer", None) is not None for layer in layers)
    assert dequant_buffer.buffered_layers(trainer.model) == 0  # tiny weights: bitsandbytes' path is as fast
    assert _op_calls(trainer.train, "bitsandbytes::gemm_4bit") > 0

    largest = max(layer.weight.quant_state.shape.numel() for layer in layers)
    itemsize = layers[0].compute_dtype.itemsize  # bf16 where the CPU has it natively, else fp32
    threshold = largest * itemsize  # only the largest layers (the MLP's) reach it
    monkeypatch.setattr(dequant_buffer, "MIN_BYTES", threshold)
    held = []

    class BeforeOptimizerStep(TrainerCallback):  # runs before the strategy's own callbacks
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            held.append(four_bit_layers(model)[0]._qlora_dequant_buffer.nbytes())

    trainer = _trainer(tiny_models["llama"], tmp_path / "half", {"cpu_dequant_buffer": True}, steps=2,
                       callbacks=[BeforeOptimizerStep()])
    expected = sum(layer.weight.quant_state.shape.numel() * itemsize >= threshold for layer in layers)
    assert 0 < dequant_buffer.buffered_layers(trainer.model) == expected < len(layers)
    trainer.train()
    report = json.loads((tmp_path / "half" / "qlora_plugin_report.json").read_text())
    assert report["quantization"]["dequant_buffer_layers"] == expected
    assert held == [largest * itemsize] * 2  # one weight in the compute dtype, never one per layer
    assert four_bit_layers(trainer.model)[0]._qlora_dequant_buffer.nbytes() == 0  # freed for the optimizer step


@pytest.mark.slow
def test_off_by_default_leaving_bitsandbytes_forward(tiny_models, tmp_path):
    from qlora_plugin.quant.layers import four_bit_layers

    trainer = _trainer(tiny_models["llama"], tmp_path, {}, steps=1)
    for layer in four_bit_layers(trainer.model):
        assert not hasattr(layer, "_qlora_dequant_buffer")
        assert "forward" not in vars(layer)


def test_a_forward_replaced_by_someone_else_is_kept_and_not_counted(tiny_models, monkeypatch):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qlora_plugin.cpu import dequant_buffer
    from qlora_plugin.quant.layers import four_bit_layers

    monkeypatch.setattr(dequant_buffer, "MIN_BYTES", 0)
    model = AutoModelForCausalLM.from_pretrained(
        tiny_models["llama"], quantization_config=BitsAndBytesConfig(load_in_4bit=True), dtype=torch.float32)
    layers = four_bit_layers(model)
    layers[0].forward = foreign = lambda x: x  # e.g. an accelerate hook
    dequant_buffer.install(model)
    assert layers[0].forward is foreign
    assert dequant_buffer.buffered_layers(model) == len(layers) - 1


@pytest.mark.slow
def test_an_option_this_run_cannot_use_is_reported_not_ignored(tiny_models, tmp_path):
    from trl import SFTConfig

    from qlora_plugin import make_trainer
    from qlora_plugin.core.options import StrategyOptions
    from qlora_plugin.cpu import dequant_buffer, dequant_reuse

    asked = {"cpu_dequant_buffer": True}
    assert dequant_buffer.inactive_note(asked, "cpu") is None
    assert "this run is on cuda: no effect" in dequant_buffer.inactive_note(asked, "cuda")
    assert dequant_buffer.inactive_note({}, "cuda") is None  # the default is not a request
    assert dequant_reuse.inactive_note(StrategyOptions(), False) is None  # off by default: nothing to say
    assert "no effect" in dequant_reuse.inactive_note(StrategyOptions(reuse_dequantized_weights=True), False)

    args = SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to="none",
                     use_cpu=True, save_strategy="no", max_length=32, gradient_checkpointing=False)
    make_trainer("qlora", model=tiny_models["llama"], args=args, train_dataset=load_dataset(str(DATA))["train"],
                 options={"reuse_dequantized_weights": True}).train()
    report = json.loads((tmp_path / "qlora_plugin_report.json").read_text())
    assert any("gradient checkpointing only, which is off" in note for note in report["fallbacks"])
