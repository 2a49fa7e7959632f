"""`--memory_budget` on CPU counts weights mapped from their file but not read yet (`cpu.resident_pages`)."""

from __future__ import annotations

import pytest
import torch

MiB = 2**20


@pytest.fixture(scope="module")
def untied_model_folder(tmp_path_factory):
    """A one-layer Llama with a 32,768 x 256 bf16 head of its own (16 MiB), saved as safetensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32768, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    folder = tmp_path_factory.mktemp("untied")
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


def test_a_tensor_mapped_from_safetensors_is_absent_until_read(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from qlora_plugin.cpu.resident_pages import absent_bytes

    save_file({"weight": torch.ones(4096, 2048, dtype=torch.bfloat16)}, str(tmp_path / "w.safetensors"))
    with safe_open(str(tmp_path / "w.safetensors"), "pt") as f:
        weight = f.get_tensor("weight")
    absent = absent_bytes([weight])
    assert absent >= 0.9 * weight.nbytes  # mapped, not read (the file header's page may be)
    assert absent_bytes([weight, weight[:10], weight]) == absent  # one storage, counted once
    assert float(weight[:2048].sum()) == weight[:2048].numel()
    assert absent_bytes([weight]) <= absent - weight.nbytes // 2  # the half read is present now
    assert float(weight.sum()) == weight.numel()
    assert absent_bytes([weight]) == 0


def test_the_budgets_measure_stays_put_when_the_first_step_reads_the_head(untied_model_folder):
    """Loaded by transformers, the head is a view of the file's map: the resident set grows when it is first read,
    and the budget's measure of what the process holds does not (it counted the head already)."""
    from transformers import AutoModelForCausalLM

    from qlora_plugin.plan.budget import _proc_kib, memory_in_use

    model = AutoModelForCausalLM.from_pretrained(untied_model_folder, dtype=torch.bfloat16)
    head = model.get_output_embeddings().weight
    with torch.no_grad():
        model.model(torch.tensor([[1, 2, 3]]))  # the decoder's first forward, whose allocations are not the point
    before, resident_before = memory_in_use("cpu", model), _proc_kib("/proc/self/status", "VmRSS")
    assert before - resident_before >= 0.9 * head.nbytes
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))  # now the head too, read in full
    after, resident_after = memory_in_use("cpu", model), _proc_kib("/proc/self/status", "VmRSS")
    assert resident_after - resident_before >= 0.9 * head.nbytes
    assert abs(after - before) < 2 * MiB
