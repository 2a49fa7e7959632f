"""`qlora-plugin merge`'s fidelity check block by block (`merge/block_check.py`): the same figures as the
whole-model check, used when that would not fit the memory of the check's device, and planned before anything is
written, so a 70B merge is checked on a machine with twice its 4-bit size in host memory."""

from __future__ import annotations

import functools
import json

import pytest

from qlora_plugin import cli
from qlora_plugin.merge import fidelity

FORCED = "forced by the test"


def _crafted_merge(base, root, four_bit=True, **lora):
    from test_merge import crafted_adapter

    adapter = crafted_adapter(base, root / "adapter", four_bit, **lora)
    assert cli.main(["merge", "--adapter", adapter, "--out", str(root / "bf16"), "--dtype", "bfloat16",
                     "--no_check"]) == 0
    return base, adapter, str(root / "bf16")


@pytest.fixture(scope="module")
def llama_merge(tiny_models, tmp_path_factory):
    return _crafted_merge(tiny_models["llama"], tmp_path_factory.mktemp("blocks"), target_modules="all-linear")


def _both_ways(base, adapter, merged, dtype="bfloat16"):
    from test_merge import quantization_settings

    settings = quantization_settings(adapter)
    return [fidelity.check(adapter, merged, base, settings, dtype, None, blocks) for blocks in (None, FORCED)]


def test_block_by_block_gives_the_whole_model_checks_figures(llama_merge):
    """Every figure of the merge and of the rounding floor is the whole-model check's (the same arithmetic, stage
    by stage, with the floor's seeds drawn as the whole model draws them); the naive merge is left out, said so."""
    whole, blocks = _both_ways(*llama_merge)
    for row in ("merge", "rounding_floor"):
        for figure, value in whole[row].items():
            assert blocks[row][figure] == pytest.approx(value, rel=1e-6, abs=1e-12), (row, figure)
    assert whole["rounding_floor"]["mean_kl"] > 1e-7 and blocks["passed"] and blocks["blocks"] == FORCED
    assert "naive_merge_into_16bit_base" not in blocks and "block by block" in blocks["naive_skipped"]
    assert "blocks" not in whole and FORCED in fidelity.format_table(blocks)


def test_dora_and_a_saved_head_block_by_block(tiny_models, tmp_path):
    """DoRA + rslora + `lm_head` in modules_to_save: the merge's figures are the whole model's. The floor's differ
    by under 2%: the whole-model check rounds a 4-bit weight only in its forward, so peft's DoRA norm reads the
    unrounded weight there, while block by block the weight itself is rounded (docs/merge.md)."""
    merge = _crafted_merge(tiny_models["llama"], tmp_path, target_modules=["q_proj", "v_proj"], use_dora=True,
                           use_rslora=True, modules_to_save=["lm_head"])
    whole, blocks = _both_ways(*merge)
    for figure, value in whole["merge"].items():
        assert blocks["merge"][figure] == pytest.approx(value, rel=1e-6), figure
    assert blocks["rounding_floor"]["mean_kl"] == pytest.approx(whole["rounding_floor"]["mean_kl"], rel=0.02)
    assert blocks["passed"]


def _tied_llama(base, folder):
    """The tiny Llama with its head tied to the embedding (no lm_head.weight stored), as SmolLM2 and Llama-3.2 are."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(base, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    tensors = load_file(folder / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return str(folder)


@pytest.mark.parametrize("case", ["16-bit base", "tied head"])
def test_block_by_block_on_a_16bit_base_and_a_tied_head(case, tiny_models, tmp_path):
    """A LoRA (not QLoRA) adapter: the reference is the adapter on the 16-bit base; a tied head: the head is the
    embedding, and the floor rounds it once, for both."""
    base = tiny_models["llama"] if case == "16-bit base" else _tied_llama(tiny_models["llama"], tmp_path / "tied")
    merge = _crafted_merge(base, tmp_path, target_modules="all-linear", four_bit=case != "16-bit base")
    whole, blocks = _both_ways(*merge)
    for row in ("merge", "rounding_floor"):
        for figure, value in whole[row].items():
            assert blocks[row][figure] == pytest.approx(value, rel=1e-6, abs=1e-12), (row, figure)
    assert blocks["passed"] and ("naive_skipped" in blocks) == (case != "16-bit base")


def test_merge_checks_block_by_block_when_the_whole_model_does_not_fit(llama_merge, tmp_path, capsys, monkeypatch):
    """The plan (before writing) finds that the whole-model check does not fit but the block check does: the merge
    is checked block by block, says so, and a wrong merge still fails."""
    _, adapter, _ = llama_merge
    monkeypatch.setattr(fidelity, "needed_bytes", lambda *args: 2**50)
    out = tmp_path / "merged"
    assert cli.main(["merge", "--adapter", adapter, "--out", str(out), "--dtype", "bfloat16"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "merge_report.json").read_text())
    assert report["passed"] and "checked block by block on cpu in about" in report["blocks"] and "check: passed" in printed
    assert "checked block by block" in printed
    assert cli.main(["merge", "--adapter", adapter, "--out", str(tmp_path / "fp4"), "--dtype", "bfloat16",
                     "--bnb_4bit_quant_type", "fp4"]) == 2
    assert "failed its fidelity check (mean KL" in capsys.readouterr().err
    fp4 = json.loads((tmp_path / "fp4.incomplete" / "merge_report.json").read_text())
    assert "blocks" in fp4 and not fp4["passed"]


def test_a_model_the_block_check_cannot_walk_is_refused_with_the_reason(tiny_models, tmp_path, capsys, monkeypatch):
    """GPT-2 (Conv1D blocks under `transformer.h`): not walked; too large for the whole-model check, so refused
    before anything is written, with the reason and --no_check, never checked halfway or skipped silently."""
    from test_merge import crafted_adapter

    adapter = crafted_adapter(tiny_models["gpt2"], tmp_path / "adapter")
    monkeypatch.setattr(fidelity, "needed_bytes", lambda *args: 2**50)
    out = tmp_path / "merged"
    assert cli.main(["merge", "--adapter", adapter, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "cannot run block by block: its architecture (gpt2)" in err and "--no_check" in err and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


@functools.cache
def _llama_70b():
    """Llama-3-70B's shapes (by the model's names) and the adapter of r=64 on every linear layer."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    linear = {n: s for n, s in shapes.items() if len(s) == 2 and ".layers." in n}
    adapter = sum(64 * (s[0] + s[1]) for s in linear.values())
    return config, shapes, linear, adapter


def test_a_70b_check_fits_twice_its_4bit_size_block_by_block(monkeypatch):
    """70B: the whole-model check (~282 GB in float32) does not fit a host with twice the 4-bit model's size;
    block by block it does, with room to spare, so `merge` plans it with the check on."""
    config, shapes, linear, adapter = _llama_70b()
    params = sum(torch_numel(s) for s in shapes.values())
    quantized = sum(torch_numel(s) for s in linear.values())
    four_bit = quantized * 4.127 / 8 + (params - quantized) * 2  # NF4 + double-quant constants; the rest bf16
    host = 2 * four_bit
    monkeypatch.setattr(fidelity, "check_device", lambda: __import__("torch").device("cpu"))
    monkeypatch.setattr(fidelity, "available_bytes", lambda device: int(host * fidelity.MEMORY_FRACTION))
    assert 69e9 < params < 72e9 and 75e9 < host < 85e9
    plan = fidelity.plan_memory(config, shapes, adapter, None)
    blocks = plan.blocks
    needed = fidelity.block_needed_bytes(shapes, adapter, config, 12)
    assert plan.device.type == "cpu" and "checked block by block" in blocks
    assert fidelity.needed_bytes(params, 128256, 12) > host
    assert needed < host * fidelity.MEMORY_FRACTION / 2  # the embedding in fp32 + temporaries, adapter, logits
    print(f"\n[70B] whole-model check {fidelity.needed_bytes(params, 128256, 12) / 1e9:.0f} GB, block by block "
          f"{needed / 1e9:.1f} GB, host 2 x 4-bit = {host / 1e9:.0f} GB ({blocks})")


def test_a_gpu_too_small_for_the_check_leaves_it_to_the_host(monkeypatch):
    """A machine with a 24 GB GPU and a large host: the 70B check fits neither way on the GPU, so it runs on the
    CPU (block by block); with a host too small as well, refused with both sizes and --no_check."""
    import torch

    from qlora_plugin.core.errors import QLoRAPluginError

    config, shapes, _, adapter = _llama_70b()
    memory = {"cuda": 24e9, "cpu": 80e9}
    monkeypatch.setattr(fidelity, "check_device", lambda: torch.device("cuda", 0))
    monkeypatch.setattr(fidelity, "available_bytes", lambda device: int(memory[device.type] * 0.8))
    plan = fidelity.plan_memory(config, shapes, adapter, None)
    assert plan.device == torch.device("cpu") and "GiB on cuda, 59.6 GiB on cpu): checked block by block on cpu in" in plan.blocks
    memory["cpu"] = 24e9
    with pytest.raises(QLoRAPluginError, match=r"more than it may use \(17.9 GiB on cuda, 17.9 GiB on cpu\), and "
                                               r"block by block it needs .*--no_check"):
        fidelity.plan_memory(config, shapes, adapter, None)
    memory["cuda"] = 400e9  # a GPU that holds the whole-model check: there, whole
    plan = fidelity.plan_memory(config, shapes, adapter, None)
    assert plan.device.type == "cuda" and plan.blocks is None


def torch_numel(shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


@pytest.mark.slow
def test_a_real_model_block_by_block_gives_the_whole_model_checks_figures(smollm2, tmp_path):
    """SmolLM2-135M-Instruct (30 blocks, tied embeddings, bf16 base): a crafted adapter on every linear layer,
    the default bf16 merge, checked both ways."""
    whole, blocks = _both_ways(*_crafted_merge(smollm2, tmp_path, target_modules="all-linear"))
    print(f"\n[SmolLM2 blocks] whole {whole['merge']} floor {whole['rounding_floor']}\n"
          f"[SmolLM2 blocks] block {blocks['merge']} floor {blocks['rounding_floor']}")
    for row in ("merge", "rounding_floor"):
        assert blocks[row]["mean_kl"] == pytest.approx(whole[row]["mean_kl"], rel=1e-6), row
    assert whole["passed"] and blocks["passed"]
