"""Mixed precision on the GPUs users have, checked on CPU.

- fp16 mixed precision: the adapter stays fp32, so the GradScaler the Accelerator creates for fp16 on a GPU can
  unscale its gradients (fp16 gradients raise "Attempting to unscale FP16 gradients" at the first step).
- Pre-Ampere GPUs (T4, V100) have no native bf16 (`torch.cuda.is_bf16_supported()` counts emulation): the
  strategy computes in fp16 there, with fp32 adapters and fp16 AMP, and says so. The GPU is faked.
"""

from __future__ import annotations

import pytest
import torch

from conftest import DATA
from qlora_plugin.core.options import StrategyOptions
from qlora_plugin.ecosystem.runtime import Runtime

T4 = Runtime("cuda", bf16_native=False, engine="none", capability=(7, 5))
A100 = Runtime("cuda", bf16_native=True, engine="none", capability=(8, 0))


def _dataset():
    from datasets import load_dataset

    return load_dataset(str(DATA), split="train").select(range(8))


@pytest.mark.parametrize("strategy", ["qlora", "lora"])
@pytest.mark.slow
def test_fp16_mixed_precision_keeps_the_adapter_fp32_for_the_grad_scaler(strategy, tiny_models, tmp_path):
    from trl import SFTConfig

    from qlora_plugin import make_trainer
    from qlora_plugin.quant.layers import four_bit_layers

    args = SFTConfig(output_dir=str(tmp_path), fp16=True, use_cpu=True, report_to="none", max_length=32,
                     per_device_train_batch_size=2, model_init_kwargs={"dtype": "float16"})
    trainer = make_trainer(strategy, model=tiny_models["llama"], args=args, train_dataset=_dataset())
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    assert trainable and {p.dtype for p in trainable} == {torch.float32}
    layers = four_bit_layers(trainer.model)
    base = {layer.compute_dtype for layer in layers} if layers else {trainer.model.get_base_model().dtype}
    assert base == {torch.float16}  # the base computes in fp16 (4-bit compute dtype, or the 16-bit weights)
    assert trainer.args.fp16 and not trainer.args.bf16

    # What the Accelerator does with fp16 on a GPU (accelerate's clip_grad_norm_ -> unscale_gradients ->
    # GradScaler.unscale_), here with torch's CPU GradScaler: the CPU Accelerator creates none.
    batch = next(iter(trainer.get_train_dataloader()))
    optimizer = trainer.create_optimizer()
    scaler = torch.amp.GradScaler("cpu")
    with torch.autocast("cpu", dtype=torch.float16):
        loss = trainer.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)  # raised "Attempting to unscale FP16 gradients." with fp16 adapters
    before = [p.detach().clone() for p in trainable]
    scaler.step(optimizer)
    assert any(not torch.equal(a, p) for a, p in zip(before, trainable))


@pytest.mark.parametrize("capability, native", [((7, 5), False), ((7, 0), False), ((8, 0), True), ((9, 0), True)])
def test_native_bf16_on_cuda_means_ampere_or_newer(monkeypatch, capability, native):
    """T4 (7.5) and V100 (7.0) emulate bf16: `torch.cuda.is_bf16_supported()` says yes there (it only tries to
    make a bf16 tensor); the runtime asks for compute capability 8.0, as `including_emulation=False` does."""
    import accelerate
    from accelerate.utils import DistributedType

    from qlora_plugin.ecosystem import runtime as runtime_module

    class FakeGpuState:
        device = torch.device("cuda", 0)
        distributed_type = DistributedType.NO
        local_process_index = 0
        num_processes = 1

    monkeypatch.setattr(accelerate, "PartialState", FakeGpuState)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.version, "hip", None)
    detected = runtime_module.detect_runtime()
    assert detected.bf16_native is native and detected.capability == capability
    assert detected.half_dtype == ("bfloat16" if native else "float16")


def test_pre_ampere_gpu_computes_in_fp16_with_fp32_adapters_and_fp16_amp(tmp_path):
    from trl import SFTConfig

    from qlora_plugin.quant.config import compute_dtype, model_init_kwargs
    from qlora_plugin.strategies.adapters import trainable_dtype
    from qlora_plugin.strategies.builtin import precision_note
    from qlora_plugin.strategies.recipe import apply_training_defaults, training_defaults

    assert compute_dtype(StrategyOptions(), T4) == torch.float16
    kwargs = model_init_kwargs(StrategyOptions(), {}, T4)
    assert kwargs["dtype"] == torch.float16 and kwargs["quantization_config"].bnb_4bit_compute_dtype == torch.float16
    assert compute_dtype(StrategyOptions(), A100) == torch.bfloat16
    assert compute_dtype(StrategyOptions(), Runtime("cpu", False, "none")) == torch.float32

    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none")  # TRL's bf16 default: on
    applied = apply_training_defaults(args, training_defaults(10**9, T4), set())
    assert applied["bf16"] is False and applied["fp16"] is True
    assert args.fp16 and not args.bf16 and args.mixed_precision == "fp16"
    assert trainable_dtype("float16", args.fp16) == "float32"
    assert trainable_dtype("float16", args.fp16, shards_parameters=True) == "float16"  # FSDP flattens one dtype
    assert trainable_dtype("float16", False) == "float32"  # fp16 compute with AMP turned off: still fp32
    note = precision_note(T4, args)
    assert "compute capability 7.5" in note and "adapters kept in fp32" in note

    on_a100 = SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    assert "fp16" not in apply_training_defaults(on_a100, training_defaults(10**9, A100), set())
    assert on_a100.bf16 and not on_a100.fp16 and precision_note(A100, on_a100) is None

    explicit = SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", bf16=True)
    applied = apply_training_defaults(explicit, training_defaults(10**9, T4), {"bf16"})
    assert "bf16" not in applied and "fp16" not in applied and explicit.bf16  # explicit wins, and is named
    assert "only emulates it" in precision_note(T4, explicit)
