"""The loading and after-load hooks on three architectures, and CPU evaluation/generation at any width."""

from __future__ import annotations

import pytest
import torch

from qlora_plugin.core.options import StrategyOptions
from qlora_plugin.ecosystem.runtime import Runtime

CPU = Runtime("cpu", bf16_native=False, engine="none")
EXPECTED_LINEARS = {
    "llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "gpt2": {"c_attn", "c_proj", "c_fc"},  # Conv1D
    "phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"},  # fused projections
}


def load_and_wrap(path, options=None, runtime=CPU):
    from trl.trainer.utils import create_model_from_path

    from qlora_plugin.strategies.adapters import wrap_with_lora
    from qlora_plugin.quant.config import model_init_kwargs

    options = options or StrategyOptions()
    model = create_model_from_path(path, **model_init_kwargs(options, {}, runtime))
    return wrap_with_lora(model, options, runtime)


@pytest.mark.parametrize("arch", sorted(EXPECTED_LINEARS))
@pytest.mark.floor
def test_every_block_linear_is_4bit_and_adapted(arch, tiny_models):
    from qlora_plugin.quant.layers import four_bit_layers, quantized_bits_per_param

    model = load_and_wrap(tiny_models[arch])
    block_linears = {name.split(".")[-2] for name, m in model.named_modules()
                     if m in four_bit_layers(model)}
    assert block_linears == EXPECTED_LINEARS[arch]
    lm_head = model.get_output_embeddings()
    assert isinstance(lm_head, torch.nn.Linear) and lm_head.weight.dtype.is_floating_point  # not quantized
    adapted = {name.split(".")[-2] for name, _ in model.named_modules() if name.endswith(".lora_A")}
    assert adapted == EXPECTED_LINEARS[arch]
    assert abs(quantized_bits_per_param(model) - 4.127) < 0.01  # NF4 + double quant


def test_no_double_quant_costs_half_a_bit_more(tiny_models):
    from qlora_plugin.quant.layers import quantized_bits_per_param

    model = load_and_wrap(tiny_models["llama"], StrategyOptions(use_bnb_nested_quant=False))
    assert abs(quantized_bits_per_param(model) - 4.5) < 0.01


def test_compute_dtype_follows_the_device(tiny_models):
    from qlora_plugin.quant.config import compute_dtype

    assert compute_dtype(StrategyOptions(), Runtime("cuda", True, "none")) == torch.bfloat16
    assert compute_dtype(StrategyOptions(), Runtime("cpu", False, "none")) == torch.float32
    assert compute_dtype(StrategyOptions(bnb_4bit_compute_dtype="float16"), CPU) == torch.float16
    assert compute_dtype(StrategyOptions(), CPU, "float16") == torch.float16  # --dtype float16: asked for


def test_quant_storage_follows_the_engine():
    from qlora_plugin.quant.config import quant_storage

    assert quant_storage(StrategyOptions(), CPU, torch.bfloat16) == torch.uint8
    for engine in ("fsdp", "deepspeed_zero3"):
        assert quant_storage(StrategyOptions(), Runtime("cuda", True, engine), torch.bfloat16) == torch.bfloat16


def test_ddp_loads_one_copy_per_rank():
    from qlora_plugin.quant.config import model_init_kwargs

    every_gpu_visible = Runtime("cuda", True, "ddp", process_index=3, num_processes=4, device_index=3)
    assert model_init_kwargs(StrategyOptions(), {}, every_gpu_visible)["device_map"] == {"": 3}
    one_gpu_per_process = Runtime("cuda", True, "ddp", process_index=3, num_processes=4, device_index=0)  # Slurm
    assert model_init_kwargs(StrategyOptions(), {}, one_gpu_per_process)["device_map"] == {"": 0}


class _FakeState:
    """accelerate's `PartialState` as a 4-process CUDA launch shows it to local rank 3."""

    def __init__(self, distributed_type, visible_gpus):
        self.distributed_type = distributed_type
        self.local_process_index, self.num_processes = 3, 4
        self.device = torch.device("cuda", 3 % visible_gpus)  # what accelerate's `set_device` computes


@pytest.mark.parametrize("visible_gpus", [4, 1])
def test_the_device_comes_from_accelerates_process_state(monkeypatch, visible_gpus):
    """With one visible GPU per process (Slurm, Kubernetes) local rank 3 trains on `cuda:0`, not `cuda:3`."""
    import accelerate
    from accelerate.utils import DistributedType

    from qlora_plugin.quant.cache import quantizing_device
    from qlora_plugin.ecosystem.runtime import detect_runtime

    monkeypatch.setattr(accelerate, "PartialState", lambda: _FakeState(DistributedType.MULTI_GPU, visible_gpus))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    runtime = detect_runtime()
    assert (runtime.engine, runtime.process_index, runtime.device_index) == ("ddp", 3, 3 % visible_gpus)
    assert quantizing_device(runtime) == f"cuda:{3 % visible_gpus}"


def test_zero3_is_seen_from_the_launchers_environment(monkeypatch):
    """A script that calls `from_pretrained` before its training arguments exist has no `HfDeepSpeedConfig` yet;
    `accelerate launch` with a ZeRO-3 config has already said so in the environment."""
    import accelerate
    from accelerate.utils import DistributedType

    from qlora_plugin.ecosystem.runtime import ZERO_STAGE_ENV, detect_runtime

    monkeypatch.setattr(accelerate, "PartialState", lambda: _FakeState(DistributedType.DEEPSPEED, 4))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setenv(ZERO_STAGE_ENV, "2")
    assert detect_runtime().engine == "deepspeed"
    monkeypatch.setenv(ZERO_STAGE_ENV, "3")
    assert detect_runtime().engine == "deepspeed_zero3"


def test_big_models_get_the_papers_big_model_recipe():
    from qlora_plugin.strategies.adapters import lora_dropout
    from qlora_plugin.strategies.recipe import training_defaults

    assert lora_dropout(StrategyOptions(), 7e9) == 0.1 and lora_dropout(StrategyOptions(), 33e9) == 0.05
    assert training_defaults(7e9, CPU)["learning_rate"] == 2e-4
    assert training_defaults(65e9, CPU)["learning_rate"] == 1e-4


def _force_repacking(model, on=True):
    """Make bitsandbytes take (or not) its AVX512-BF16 repacking path, as it does on CPUs with that instruction:
    the tests then mean the same on every CPU."""
    from qlora_plugin.quant.layers import four_bit_layers

    for layer in four_bit_layers(model):
        layer.support_avx512bf16_for_cpu = on


def test_cpu_repacking_breaks_odd_widths_without_the_guard(tiny_models):
    """The bitsandbytes limitation the guard exists for: eval at widths that are not multiples of 32/64."""
    model = load_and_wrap(tiny_models["llama_odd"]).eval()
    _force_repacking(model)
    with pytest.raises((AssertionError, RuntimeError)), torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]]))


@pytest.mark.slow
def test_guard_keeps_eval_and_generation_working_at_odd_widths(tiny_models):
    from qlora_plugin import make_cpu_inference_safe

    model = load_and_wrap(tiny_models["llama_odd"])
    ids = torch.tensor([[1, 5, 9, 13]])
    _force_repacking(model, False)  # the reference: bitsandbytes' generic dequantize-then-matmul path
    with torch.no_grad():
        reference = model.eval()(input_ids=ids).logits
    _force_repacking(model)
    make_cpu_inference_safe(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference)
        one = model(input_ids=ids[:, :1]).logits  # a single token takes bitsandbytes' gemv path
        assert torch.allclose(one, reference[:, :1], atol=1e-4)
    assert model.generate(input_ids=ids, max_new_tokens=3, do_sample=False).shape == (1, 7)


def test_guard_needs_no_private_bitsandbytes_function_unless_a_layer_was_repacked(tiny_models, monkeypatch):
    """Every run (GPU ones too) passes through the guard; a bitsandbytes without the private inverse of the CPU
    repacking (older releases) must not break a base that was never repacked."""
    import bitsandbytes.functional

    from qlora_plugin import make_cpu_inference_safe
    from qlora_plugin.quant.layers import four_bit_layers

    model = load_and_wrap(tiny_models["llama"])
    monkeypatch.delattr(bitsandbytes.functional, "_convert_weight_packed_for_cpu_inverse")
    make_cpu_inference_safe(model)
    assert not any(layer.support_avx512bf16_for_cpu for layer in four_bit_layers(model))


def _frozen_bytes(model) -> int:
    frozen = [p for p in model.parameters() if not p.requires_grad]
    return sum(t.numel() * t.element_size() for t in [*frozen, *model.buffers()])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # separate head; head tied to the embeddings
@pytest.mark.slow
def test_embeddings_and_head_stay_in_the_16bit_compute_dtype(tiny_models, arch):
    """peft's k-bit preparation alone upcasts them to fp32; the strategy keeps them as loaded (bf16 here) and the
    norms in fp32, as the paper's code does, and the plan's weights count exactly that."""
    from peft import prepare_model_for_kbit_training
    from trl.trainer.utils import create_model_from_path

    from qlora_plugin.models.model_config import load_config
    from qlora_plugin.plan.estimate import parameter_costs
    from qlora_plugin.plan.skeleton import skeleton
    from qlora_plugin.quant.config import model_init_kwargs
    from qlora_plugin.strategies.builtin import QLORA

    bf16 = Runtime("cpu", bf16_native=True, engine="none")
    base = load_and_wrap(tiny_models[arch], runtime=bf16).get_base_model()
    embeddings = {id(m.weight): m.weight for m in (base.get_input_embeddings(), base.get_output_embeddings())}
    assert {w.dtype for w in embeddings.values()} == {torch.bfloat16}
    assert {p.dtype for n, p in base.named_parameters() if "norm" in n or ".ln_" in n} == {torch.float32}

    loaded = create_model_from_path(tiny_models[arch], **model_init_kwargs(StrategyOptions(), {}, bf16))
    peft_alone = prepare_model_for_kbit_training(loaded, use_gradient_checkpointing=False)
    assert peft_alone.get_input_embeddings().weight.dtype == torch.float32
    saved = 2 * sum(w.numel() for w in embeddings.values())  # fp32 -> bf16: 2 bytes per element
    assert _frozen_bytes(peft_alone) - _frozen_bytes(base) == saved

    costs = parameter_costs(skeleton(load_config(tiny_models[arch]), QLORA, StrategyOptions(), "bfloat16"),
                            StrategyOptions())
    assert costs["packed"] + costs["other"] == _frozen_bytes(base)

    # Outside autocast (generate(), evaluation by hand) the fp32 hidden states still meet the bf16 head.
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        assert torch.isfinite(base(input_ids=ids).logits).all()
    assert base.generate(input_ids=ids, max_new_tokens=2, do_sample=False).shape == (1, 6)
