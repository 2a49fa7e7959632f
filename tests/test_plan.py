"""`qlora-plugin plan`: the paper's headline from LLaMA-65B's config, the weights against real 4-bit loads, the
predicted peak against a real training run, and the command's output and errors."""

from __future__ import annotations

import json
import os
import sys

import pytest

from conftest import REPO, run_command

sys.path.insert(0, str(REPO / "examples"))

CONFIGS = REPO / "examples" / "configs"


def plan_cli(argv, capsys) -> tuple[int, str, str]:
    from qlora_plugin.cli import main

    try:
        code = main(["plan", *argv])
    except SystemExit as exit_:  # argparse errors
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def test_llama_65b_fits_one_48gb_gpu_and_full_needs_over_780gb(capsys):
    code, out, _ = plan_cli([str(CONFIGS / "llama-65b"), "--json", "--gpu-memory", "48GB"], capsys)
    assert code == 0
    plans = {p["strategy"]: p for p in json.loads(out)}
    assert list(plans) == ["qlora", "lora", "full"]
    qlora, lora, full = plans["qlora"], plans["lora"], plans["full"]
    for p in plans.values():
        assert p["total_bytes"] == sum(p["components"].values())
        assert set(p["components"]) == {"weights", "adapters", "gradients", "optimizer", "activations", "runtime"}
    print({name: round(p["total_bytes"] / 1e9, 1) for name, p in plans.items()}, "GB")
    assert qlora["fits"] and qlora["total_bytes"] < 48e9
    assert not lora["fits"]
    assert full["total_bytes"] > 780e9
    assert qlora["details"]["bits_per_4bit_param"] == pytest.approx(4.127, abs=0.001)
    assert qlora["details"]["layers_4bit"] == 80 * 7  # every linear layer of the blocks, not lm_head
    assert qlora["details"]["params"] == pytest.approx(65.3e9 + qlora["details"]["trainable_params"], rel=0.01)
    # the recipe by size: paged AdamW 32-bit (8 bytes per trained parameter), checkpointing on
    assert qlora["components"]["optimizer"] == 8 * qlora["details"]["trainable_params"]
    assert qlora["details"]["gradient_checkpointing"] is True
    assert qlora["details"]["activations_with_checkpointing"] < qlora["details"]["activations_without_checkpointing"]


def _qlora_7b_plan(capsys, *flags) -> dict:
    code, out, _ = plan_cli([str(CONFIGS / "llama-7b"), "--json", "--strategy", "qlora", *flags], capsys)
    assert code == 0
    return json.loads(out)


def test_a_gpu_without_bf16_plans_fp16_compute_with_fp32_adapters(capsys):
    t4, a10 = (_qlora_7b_plan(capsys, "--gpu-memory", gpu) for gpu in ("t4", "a10"))
    assert (t4["details"]["compute_dtype"], t4["details"]["adapter_dtype"]) == ("float16", "float32")
    assert (a10["details"]["compute_dtype"], a10["details"]["adapter_dtype"]) == ("bfloat16", "bfloat16")
    trainable = t4["details"]["trainable_params"]
    assert t4["components"]["adapters"] == 4 * trainable and a10["components"]["adapters"] == 2 * trainable


def test_cuda_plan_has_the_context_and_separates_the_paged_optimizer_state(capsys):
    """On a GPU the CUDA context is on the card but outside the allocator, and bitsandbytes' paged optimizer
    state (parameters of 100,000+ elements) lives in CUDA unified memory, outside `max_memory_reserved`: the plan
    counts both in its peak and says what the allocator alone should reserve (what the report compares)."""
    from qlora_plugin.plan.estimate import CPU_RUNTIME_BYTES, CUDA_CONTEXT_BYTES

    cuda, cpu = (_qlora_7b_plan(capsys, "--device", device) for device in ("cuda", "cpu"))
    assert cuda["components"]["runtime"] == CUDA_CONTEXT_BYTES and cpu["components"]["runtime"] == CPU_RUNTIME_BYTES
    # every LoRA matrix of LLaMA-7B at r=64 has 64 x 4096+ elements: all of the 32-bit state is paged
    assert cuda["details"]["optimizer_paged_bytes"] == cuda["components"]["optimizer"] > 0
    assert cuda["details"]["allocator_bytes"] == (cuda["total_bytes"] - CUDA_CONTEXT_BYTES
                                                  - cuda["details"]["optimizer_paged_bytes"])
    assert cpu["details"]["optimizer_paged_bytes"] == 0 and cpu["details"]["allocator_bytes"] is None


def test_activations_are_counted_under_mixed_precision():
    """Autocast does not act on meta tensors; the count stands in for it, so the matmuls keep 16-bit copies of
    their fp32 inputs as they do in a bf16 run (before, the fp32 inputs themselves were counted)."""
    import torch

    from qlora_plugin.model_config import load_config
    from qlora_plugin.options import StrategyOptions
    from qlora_plugin.plan.activations import activation_bytes, saved_bytes
    from qlora_plugin.plan.skeleton import skeleton
    from qlora_plugin.strategies.builtin import QLORA

    with torch.device("meta"):
        linear = torch.nn.Linear(64, 32)

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.linear = torch.nn.Embedding(10, 64, device="meta"), linear

        def forward(self, input_ids, labels=None):
            return self.linear(self.embed(input_ids)).sum()

    fp32 = saved_bytes(One(), 2, 8)
    bf16 = saved_bytes(One(), 2, 8, amp_dtype=torch.bfloat16)
    ids = 2 * 8 * 8  # the embedding's backward keeps the token ids
    assert fp32 == ids + 2 * 8 * 64 * 4  # the linear's fp32 input (its weight is a parameter)
    assert bf16 == ids + 2 * 8 * 64 * 2 + 32 * 64 * 2  # the bf16 copies of the input and the weight

    config = load_config(str(CONFIGS / "llama-7b"))
    build = lambda cfg: skeleton(cfg, QLORA, StrategyOptions(), "bfloat16")  # noqa: E731
    plain = activation_bytes(config, build, 1, 512, False)
    mixed = activation_bytes(config, build, 1, 512, False, "bfloat16")
    assert mixed["per_layer"] < plain["per_layer"]  # q, k, v (fp32 after the 4-bit layers) kept in bf16


def test_report_compares_like_with_like():
    from qlora_plugin.training.report import peak_memory, prediction_error

    gpu = {"memory_kind": "cuda_max_reserved", "predicted_peak_bytes": 1500, "predicted_allocator_bytes": 1000}
    assert prediction_error(gpu, 800) == 0.25  # the allocator part against max_memory_reserved
    cpu = {"memory_kind": "process_peak_rss", "predicted_peak_bytes": 1500}
    assert prediction_error(cpu, 1000) == 0.5
    assert prediction_error({"memory_kind": "process_peak_rss", "predicted_peak_bytes": None}, 1000) is None
    assert peak_memory()["memory_kind"] == "process_peak_rss"  # no CUDA here


def test_sharded_engines_do_not_split_the_4bit_base_at_load_time(capsys):
    """transformers 5.24 loads the whole 4-bit base onto every rank's GPU under FSDP / ZeRO-3; plan says so when
    a 4-bit plan does not fit one GPU, so nobody counts on two 24 GB cards for 65B."""
    code, out, _ = plan_cli([str(CONFIGS / "llama-65b"), "--strategy", "qlora", "--gpu-memory", "24GB"], capsys)
    assert code == 0
    assert "qlora on several GPUs (FSDP / ZeRO-3): each GPU still holds the whole 4-bit base while the model loads " \
           "(32.10 GiB, which does not fit in one GPU)" in out
    code, out, _ = plan_cli([str(CONFIGS / "llama-65b"), "--strategy", "qlora", "--gpu-memory", "48GB"], capsys)
    assert code == 0 and "several GPUs" not in out  # it fits one GPU: nothing to say


def test_double_quantization_arithmetic():
    from qlora_plugin.plan.estimate import four_bit_bytes

    n = 8192 * 22016  # LLaMA-65B's largest matrix
    bits = {dq: 8 * sum(four_bit_bytes(n, dq).values()) / n for dq in (True, False)}
    assert bits[True] == pytest.approx(4.127, abs=0.001)
    assert bits[False] == pytest.approx(4.5, abs=0.001)
    # quant storage in another dtype packs the same bytes
    assert four_bit_bytes(n, True, storage_itemsize=2) == four_bit_bytes(n, True)


@pytest.mark.parametrize("arch, double_quant", [("llama", True), ("gpt2", True), ("phi3", True), ("llama", False)])
def test_weights_match_real_4bit_loads(tiny_models, arch, double_quant):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qlora_plugin.options import StrategyOptions
    from qlora_plugin.model_config import load_config
    from qlora_plugin.plan.estimate import parameter_costs
    from qlora_plugin.plan.skeleton import skeleton
    from qlora_plugin.quant.layers import four_bit_layers, quant_state_bytes
    from qlora_plugin.strategies.builtin import QLORA

    path = tiny_models[arch]
    options = StrategyOptions(use_bnb_nested_quant=double_quant)
    costs = parameter_costs(skeleton(load_config(path), QLORA, options, "float32"), options)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                                bnb_4bit_compute_dtype=torch.float32)
    loaded = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.float32)
    assert costs["layers_4bit"] == len(four_bit_layers(loaded))
    # get_memory_footprint() sees the packed codes and the unquantized rest; the constants are extra
    footprint = loaded.get_memory_footprint()
    assert costs["packed"] + costs["other"] == pytest.approx(footprint, rel=0.01)
    assert costs["constants"] == pytest.approx(quant_state_bytes(loaded), rel=0.01)
    predicted = costs["packed"] + costs["constants"] + costs["other"]
    print(f"{arch} (double quant {double_quant}): weights predicted {predicted:,} B, loaded {footprint + quant_state_bytes(loaded):,} B")


def test_training_report_states_predicted_and_measured_peak(tmp_path):
    """Wide enough (256) that the model's terms are not lost in the framework's ~520 MiB."""
    from plan_accuracy import long_text_dataset, train_and_compare

    from qlora_plugin.runtime import cpu_has_native_bf16
    from qlora_plugin.tiny_model import build_tiny_model

    model = build_tiny_model(str(tmp_path / "model"), "llama", hidden_size=256, layers=2, intermediate_size=688)
    data = long_text_dataset(str(tmp_path / "data"), rows=16)
    memory = train_and_compare(model, data, str(tmp_path / "run"), "qlora", batch=8, seq=256,
                               checkpointing=False, steps=2, extra=["--use_cpu"])
    predicted, measured = memory["predicted_peak_bytes"], memory["measured_peak_bytes"]
    assert memory["memory_kind"] == "process_peak_rss"
    compute = "bfloat16" if cpu_has_native_bf16() else "float32"  # what the strategy picks on this CPU
    assert memory["predicted_for"] == {"batch_size": 8, "seq_len": 256, "gradient_checkpointing": False,
                                       "optimizer": "paged_adamw_32bit", "device": "cpu", "compute_dtype": compute,
                                       "mixed_precision": "bfloat16" if compute == "bfloat16" else None}
    runtime = memory["predicted_components"]["runtime"]
    print(f"predicted {predicted / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB, "
          f"model terms {(predicted - runtime) / 2**20:.0f} vs {(measured - runtime) / 2**20:.0f} MiB")
    assert memory["prediction_error"] == pytest.approx(predicted / measured - 1, abs=1e-4)
    assert abs(predicted / measured - 1) < 0.20
    assert abs((predicted - runtime) / (measured - runtime) - 1) < 0.45  # beyond the framework baseline


def test_table_and_plot(tiny_models, tmp_path, capsys):
    plot = tmp_path / "memory.png"
    code, out, _ = plan_cli([tiny_models["llama"], "--device", "cpu", "--plot", str(plot), "--gpu-memory", "t4"],
                            capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[1].split() == ["component", "qlora", "lora", "full"]
    for name in ("weights", "adapters", "gradients", "optimizer", "activations", "runtime", "peak"):
        assert any(line.startswith(name) for line in lines), name
    assert "fits" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["memory.png"]  # no temporary file left behind


def test_options_change_the_plan(tiny_models, capsys):
    def plan(*flags):
        code, out, _ = plan_cli([tiny_models["llama"], "--strategy", "qlora", "--json", *flags], capsys)
        assert code == 0
        return json.loads(out)

    base = plan()
    assert isinstance(base, dict) and base["strategy"] == "qlora"  # one strategy: one object
    small = plan("--lora_r", "8")
    assert small["components"]["adapters"] < base["components"]["adapters"]
    eight_bit = plan("--optim", "paged_adamw_8bit")
    assert eight_bit["components"]["optimizer"] < base["components"]["optimizer"]
    no_dq = plan("--use_bnb_nested_quant", "false")  # on layers this small the nested code map costs more
    assert no_dq["details"]["weights_4bit_constants_bytes"] != base["details"]["weights_4bit_constants_bytes"]
    longer = plan("--seq-len", "1024", "--gradient_checkpointing", "false")
    assert longer["components"]["activations"] > base["components"]["activations"]


@pytest.mark.parametrize("argv, message", [
    (["/no/such/folder"], "No such model folder"),
    (["{empty}"], "has no config.json"),
    (["{model}", "--batch-size", "0"], "`batch_size` must be a positive integer"),
    (["{model}", "--batch-size", "two"], "invalid int value"),
    (["{model}", "--strategy", "qlroa"], "Did you mean 'qlora'"),
    (["{model}", "--optim", "lion_8bit"], "not modelled by plan"),
    (["{model}", "--lora_r", "0"], "`lora_r` must be a positive integer"),
    (["{model}", "--gpu-memory", "lots"], "is not a size"),
    (["{model}", "--plot", "/no/such/dir/memory.png"], "not a writable folder"),
    (["{model}", "--plot", "{tmp}/memory.txt"], "use a .png"),
    (["{model}", "--frobnicate", "3"], "unrecognized arguments: --frobnicate"),
])
def test_bad_input_is_a_clear_error(tiny_models, tmp_path, capsys, argv, message):
    (tmp_path / "empty").mkdir()
    argv = [a.format(model=tiny_models["llama"], empty=tmp_path / "empty", tmp=tmp_path) for a in argv]
    code, out, err = plan_cli(argv, capsys)
    assert code == 2
    assert message in err
    assert "Traceback" not in err and out == ""
    assert sorted(os.listdir(tmp_path)) == ["empty"]  # nothing written


def test_console_script_error_has_no_traceback(tmp_path):
    result = run_command(["qlora-plugin", "plan", str(tmp_path)], cwd=tmp_path)
    assert result.returncode == 2
    assert "has no config.json" in result.stderr and "Traceback" not in result.stderr
