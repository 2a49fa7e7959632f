"""What `plan` assumes when the user does not say: the machine it runs on, sizes a person reads, and what its
bits per 4-bit weight count (beside the run summary's 4.127)."""

from __future__ import annotations

import pytest

from test_plan import plan_cli


@pytest.mark.parametrize("gpu", [False, True])
def test_plan_defaults_to_the_machine_it_runs_on(tiny_models, capsys, monkeypatch, gpu):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    code, out, _ = plan_cli([tiny_models["llama"], "--strategy", "qlora"], capsys)
    assert code == 0
    title = out.splitlines()[0]
    if gpu:
        assert "device cuda (this machine's GPU; --device cpu plans for the CPU)" in title, title
    else:
        assert "device cpu (this machine has no GPU torch can use; --device cuda plans for a GPU)" in title, title


def test_gpu_memory_plans_for_a_gpu_and_the_device_flag_wins(tiny_models, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, out, _ = plan_cli([tiny_models["llama"], "--gpu-memory", "24GB"], capsys)
    assert code == 0 and "device cuda (--gpu-memory names a GPU)" in out.splitlines()[0]
    code, out, _ = plan_cli([tiny_models["llama"], "--device", "cuda"], capsys)
    assert code == 0 and out.splitlines()[0].endswith("device cuda")  # asked for: nothing to explain


def test_a_tiny_model_shows_a_readable_size_and_what_the_bits_count(tiny_models, capsys):
    code, out, _ = plan_cli([tiny_models["llama"], "--device", "cpu"], capsys)
    assert code == 0
    title = out.splitlines()[0]
    assert "0.00B" not in title and ("K params" in title or "M params" in title), title
    assert "bits per 4-bit weight, all storage" in out
    assert "what a run's summary and the paper count: 4.127 with double quantization" in out
