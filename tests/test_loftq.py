"""`init_lora_weights`: the LoftQ start cancels the 4-bit quantization error it can, deterministically, on every
adapted layer kind; the calibrated one cancels more of what the layers' inputs see, computed from the first training
examples when a fresh run starts; `auto` picks it only where it can run; an explicit LoftQ start where it cannot is
refused."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import TrainerCallback

from qlora_plugin.core.errors import QLoRAPluginError
from qlora_plugin.core.options import StrategyOptions
from qlora_plugin.ecosystem.runtime import Runtime
from qlora_plugin.strategies.adapters import lora_init, wrap_with_lora
from qlora_plugin.strategies.loftq import PEFT_PREFIX, SafetensorsWeights

CPU = Runtime("cpu", False, "none")


def _four_bit(path: str):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.float32)


def _layer_errors(model, path: str, inputs_like=None) -> list[tuple[str, float, float]]:
    """(layer, |(Q + s·BA) - W|, |Q - W|) of every 4-bit LoRA layer, on the same random inputs, shaped by
    `inputs_like(width)` when given (a vector: each channel's scale; a matrix L: inputs with second moment L·Lᵀ)."""
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
        if inputs_like is not None:
            shape = inputs_like(quantized.shape[1])
            x = x @ shape.T if shape.dim() == 2 else x * shape
        with torch.no_grad():
            adapted = module(x).float()
        target = x @ original.T
        out.append((name, float((adapted - target).norm()), float((x @ quantized.T - target).norm())))
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: Conv1D layers, stored transposed in the checkpoint
@pytest.mark.slow
def test_loftq_start_brings_every_layer_closer_to_16_bit(tiny_models, arch):
    model = wrap_with_lora(_four_bit(tiny_models[arch]), StrategyOptions(init_lora_weights="loftq", lora_r=8), CPU)
    facts = model.qlora_lora_init
    assert facts["method"] == "loftq" and facts["layers"] > 0 and 0.0 < facts["error_cancelled"] < 1.0
    errors = _layer_errors(model, tiny_models[arch])
    assert len(errors) == facts["layers"]
    for name, with_adapter, without in errors:
        assert with_adapter < without, (name, with_adapter, without)
    # laid out like the parameters they replace: DDP's gradient buckets and broadcasts assume it (a transposed
    # factor was broadcast as its transpose under gloo, and rank 1 trained a different start)
    assert all(p.is_contiguous() for p in model.parameters() if p.requires_grad)


@pytest.mark.slow
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


@pytest.mark.slow
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


def _outlier_channels(width: int):
    """Input channels as real activations have them: a few far larger than the rest."""
    scale = torch.ones(width)
    scale[[1, width // 2, width - 3]] = 25.0
    return scale


def _correlated_outliers(width: int):
    """The same, with the channels correlated (the Cholesky factor of their second-moment matrix)."""
    mixing = torch.randn(width, width, generator=torch.Generator().manual_seed(width)) / width ** 0.5
    scaled = mixing * _outlier_channels(width)
    return torch.linalg.cholesky(scaled @ scaled.T + 0.01 * torch.eye(width))


@pytest.mark.parametrize("inputs_like", [_outlier_channels, _correlated_outliers], ids=["channel-scales", "covariance"])
@pytest.mark.slow
def test_calibrated_start_cancels_more_of_the_error_the_inputs_see(tiny_models, inputs_like):
    """Weighted by what the inputs look like, the rank-4 correction leaves every layer's output error on such inputs
    below what the plain LoftQ start leaves."""
    from peft.tuners.lora import Linear4bit

    from qlora_plugin.strategies.loftq import loftq_initialise

    path = tiny_models["llama"]
    plain = wrap_with_lora(_four_bit(path), StrategyOptions(init_lora_weights="loftq", lora_r=4), CPU)
    calibrated = wrap_with_lora(_four_bit(path), StrategyOptions(init_lora_weights="default", lora_r=4), CPU)
    weights = {name: inputs_like(module.in_features) for name, module in calibrated.named_modules()
               if isinstance(module, Linear4bit)}
    facts = loftq_initialise(calibrated, input_weights=weights)
    assert facts["layers"] == plain.qlora_lora_init["layers"] == len(weights)
    seen_plain = {name: error for name, error, _ in _layer_errors(plain, path, inputs_like)}
    for name, error, without in _layer_errors(calibrated, path, inputs_like):
        assert error < seen_plain[name] < without, (name, error, seen_plain[name], without)


@pytest.mark.parametrize("limit, kind", [(1 << 30, "covariance"), (0, "channel scales")])
@pytest.mark.slow
def test_input_weights_count_every_real_token_and_no_padding(tiny_models, limit, kind):
    """Padding changes nothing; q/k/v (and gate/up) share the statistics of the one input they are fed; measured
    one input per pass, the covariances are the same as in one pass; above the memory limit, per-channel scales."""
    from qlora_plugin.strategies.calibration import InputWeights

    model = wrap_with_lora(_four_bit(tiny_models["llama"]), StrategyOptions(init_lora_weights="default"), CPU)
    names = [n for n, m in model.named_modules() if n.endswith("_proj") and hasattr(m, "lora_A")]
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(2))
    plain = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    padded = [{"input_ids": torch.cat([ids, torch.zeros(2, 5, dtype=ids.dtype)], 1),
               "attention_mask": torch.cat([torch.ones_like(ids), torch.zeros(2, 5, dtype=ids.dtype)], 1)}]
    model.train()
    one_pass = InputWeights(model, plain, covariance_limit=limit)
    weights = {name: one_pass[name] for name in names}
    per_input = InputWeights(model, padded, covariance_limit=limit, group_bytes=1)
    assert model.training  # put back as it was
    assert one_pass.kind == kind and one_pass.tokens == 14 and one_pass.passes == 1
    for name in names:
        width = model.get_submodule(name).in_features
        assert weights[name].shape == ((width, width) if kind == "covariance" else (width,))
        torch.testing.assert_close(weights[name], per_input[name], rtol=1e-4, atol=1e-5)
    assert per_input.tokens == 14 and per_input.passes == (4 * 2 if kind == "covariance" else 1)  # 2 blocks
    attention = [weights[n] for n in names if n.endswith(("q_proj", "k_proj", "v_proj")) and ".layers.0." in n]
    assert len(attention) == 3 and attention[0] is attention[1] is attention[2]
    if kind == "covariance":
        assert all(bool(torch.all(w.diagonal() > 0)) and torch.equal(w, w.tril()) for w in weights.values())


@pytest.mark.slow
def test_a_fresh_run_starts_calibrated_and_a_resumed_one_keeps_its_checkpoint(tiny_models, tmp_path, capsys,
                                                                            monkeypatch):
    """auto on a 4-bit base: the summary announces the calibrated start, the first step computes it from the first
    training examples and says so; the same run again loads it from the start cache, another rank does not;
    resuming leaves the checkpoint's adapter as it was saved."""
    from datasets import load_dataset
    from trl import SFTConfig

    from conftest import DATA
    from qlora_plugin import make_trainer

    monkeypatch.setenv("QLORA_PLUGIN_CACHE_DIR", str(tmp_path / "cache"))  # no start another test cached

    def trainer(steps, rank=4, out=tmp_path):
        args = SFTConfig(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, report_to="none",
                         use_cpu=True, save_steps=1, max_length=64, seed=0, learning_rate=1e-3)
        return make_trainer("qlora", model=tiny_models["llama"], args=args, options={"lora_r": rank},
                            train_dataset=load_dataset(str(DATA))["train"])

    first = trainer(1)
    assert "computed when training starts" in capsys.readouterr().out
    first.train()
    init = first.model.qlora_lora_init
    assert init["method"] == "loftq_calibrated" and init["examples"] == 16 and init["tokens"] > 16
    assert 0.0 < init["error_cancelled"] < 1.0 and "pending" not in init and init["weighting"] == "covariance"
    assert init["passes"] == 1  # the tiny model's covariances fit in one group
    assert "loftq_calibrated: the adapters start" in capsys.readouterr().out
    report = json.loads((tmp_path / "qlora_plugin_report.json").read_text())
    assert report["adapter"]["init"]["examples"] == 16

    again = trainer(1)  # the same base, adapter and first batches: the start comes from the cache
    again.train()
    assert again.model.qlora_lora_init["cached"] and "loaded from the start cache" in capsys.readouterr().out
    assert again.model.qlora_lora_init["error_cancelled"] == init["error_cancelled"]
    trained = [{n: p for n, p in t.model.named_parameters() if "lora_" in n} for t in (first, again)]
    assert trained[0].keys() == trained[1].keys() and all(torch.equal(trained[0][n], trained[1][n]) for n in trained[0])
    other = trainer(1, rank=2, out=tmp_path / "rank2")
    other.train()  # another rank: another key
    assert not other.model.qlora_lora_init.get("cached")

    resumed = trainer(2)
    saved = {n: p.detach().clone() for n, p in resumed.model.named_parameters() if "lora_" in n}
    captured = {}

    class Capture(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            captured.update({n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n})

    resumed.add_callback(Capture())
    resumed.train(resume_from_checkpoint=True)
    assert "resumed" in resumed.model.qlora_lora_init["note"]
    from safetensors.torch import load_file

    checkpoint = load_file(str(tmp_path / "checkpoint-1" / "adapter_model.safetensors"))
    assert any(not torch.equal(saved[n], captured[n]) for n in saved)  # the checkpoint replaced the fresh start
    for name, value in checkpoint.items():
        match = [n for n in captured if n.replace(".default", "") == name]
        assert match and torch.allclose(captured[match[0]].float(), value.float()), name


def test_damping_makes_a_singular_covariance_factorable_and_an_empty_one_is_an_error():
    from qlora_plugin.strategies.calibration import damped_cholesky

    x = torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x[:, 2] = 0  # a channel that never fires, and fewer tokens than channels: singular
    factor = damped_cholesky(x.T @ x)
    assert torch.equal(factor, factor.tril()) and bool((factor.diagonal() > 0).all())
    with pytest.raises(QLoRAPluginError, match="stayed singular.*--init_lora_weights loftq"):
        damped_cholesky(torch.zeros(4, 4, dtype=torch.float64))


def test_calibration_reads_the_first_rows_in_order_and_stops_at_the_token_cap():
    from types import SimpleNamespace

    from qlora_plugin.strategies.calibration import first_batches

    rows = [{"input_ids": [i] * (10 + i)} for i in range(40)]

    def collate(chunk):  # pads to the longest, as the SFT collator does
        width = max(len(r["input_ids"]) for r in chunk)
        ids = torch.tensor([r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in chunk])
        return {"input_ids": ids, "attention_mask": (ids != 0).long() | (torch.arange(width) < 10).long()}

    loader = SimpleNamespace(dataset=rows, collate_fn=collate)
    batches, used = first_batches(loader, examples=16, batch_size=4, tokens=10_000)
    assert used == 16 and len(batches) == 4 and batches[0]["input_ids"][1, 0] == 1  # rows 0-15, unshuffled
    batches, used = first_batches(loader, examples=16, batch_size=4, tokens=50)  # rows 0-3 hold 10+11+12+13
    assert used == 8 and len(batches) == 2  # the batch that crosses the cap is the last one
    assert first_batches(loader, examples=16, batch_size=4, tokens=1)[1] == 4  # always at least one batch


@pytest.mark.slow
def test_calibration_without_training_data_says_what_to_do(tiny_models):
    """Chosen by the user: the run stops with the fix. Chosen by auto: the plain loftq start runs, saying why."""
    from types import SimpleNamespace

    from qlora_plugin.strategies.calibration import CalibratedLoftQ

    args, state = SimpleNamespace(per_device_train_batch_size=4), SimpleNamespace(global_step=0,
                                                                                  is_world_process_zero=True)
    model = wrap_with_lora(_four_bit(tiny_models["llama"]), StrategyOptions(), CPU)
    assert model.qlora_lora_init["pending"]
    with pytest.raises(QLoRAPluginError, match="no training dataloader.*--init_lora_weights loftq"):
        CalibratedLoftQ(dict(model.qlora_lora_init), chosen_by_user=True).on_train_begin(args, state, None, model)
    assert all(float(p.detach().abs().sum()) == 0 for n, p in model.named_parameters() if "lora_B" in n)
    init = dict(model.qlora_lora_init)
    CalibratedLoftQ(init, chosen_by_user=False).on_train_begin(args, state, None, model)
    assert init["method"] == "loftq" and "not calibrated" in init["note"] and init["error_cancelled"] > 0
    assert any(float(p.detach().abs().sum()) > 0 for n, p in model.named_parameters() if "lora_B" in n)


class _TwoProcesses:
    """torch.distributed as rank 1 of 2 sees it; rank 0's side of each broadcast is `rank_zero`."""

    def __init__(self, monkeypatch, rank_zero):
        import torch.distributed as dist

        self.received = []
        for name, value in (("is_available", lambda: True), ("is_initialized", lambda: True),
                            ("get_rank", lambda: 1), ("get_world_size", lambda: 2),
                            ("broadcast_object_list", self.objects), ("broadcast", self.tensor)):
            monkeypatch.setattr(dist, name, value)
        self.rank_zero = rank_zero

    def objects(self, box, src):
        assert src == 0 and box == [None, None]  # rank 1 sends nothing
        box[:] = self.rank_zero

    def tensor(self, tensor, src):
        assert src == 0
        tensor.fill_(0.5)  # rank 0's adapter
        self.received.append(tensor)


def test_under_torch_distributed_only_rank_zero_computes_the_start(tiny_models, monkeypatch, capsys):
    """Rank 1 neither reads the batches nor the 16-bit base: it takes rank 0's facts and adapter (issue 26, item 6),
    and rank 0's error stops it too instead of leaving it waiting."""
    from types import SimpleNamespace

    from qlora_plugin.strategies import calibration

    model = wrap_with_lora(_four_bit(tiny_models["llama"]), StrategyOptions(), CPU)
    computed = []
    monkeypatch.setattr(calibration, "first_batches", lambda *a: ([], 16))  # every rank iterates the dataloader
    monkeypatch.setattr(calibration, "InputWeights", lambda *a: computed.append("statistics"))
    monkeypatch.setattr(calibration, "loftq_initialise", lambda *a, **k: computed.append("loftq"))
    rank_zero_facts = {"method": "loftq_calibrated", "error_cancelled": 0.4, "layers": 14, "seconds": 1.0}
    group = _TwoProcesses(monkeypatch, [rank_zero_facts, None])
    args, state = SimpleNamespace(per_device_train_batch_size=4), SimpleNamespace(global_step=0,
                                                                                  is_world_process_zero=False)
    init = dict(model.qlora_lora_init)
    calibration.CalibratedLoftQ(init, chosen_by_user=False).on_train_begin(args, state, None, model, None)
    assert computed == [] and init == rank_zero_facts
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(group.received) == len(trainable) and all(bool((p == 0.5).all()) for p in trainable)
    _TwoProcesses(monkeypatch, [None, "`init_lora_weights loftq_calibrated`: the training dataset is empty."])
    with pytest.raises(QLoRAPluginError, match="dataset is empty"):
        calibration.CalibratedLoftQ(dict(model.qlora_lora_init), True).on_train_begin(args, state, None, model)


def test_auto_is_loftq_only_where_it_can_run():
    assert lora_init(StrategyOptions(), four_bit=True, shards_parameters=False) == "loftq_calibrated"
    assert lora_init(StrategyOptions(), four_bit=False, shards_parameters=False) == "default"
    assert lora_init(StrategyOptions(use_dora=True), four_bit=True, shards_parameters=False) == "default"
    assert lora_init(StrategyOptions(), four_bit=True, shards_parameters=True) == "default"
    assert lora_init(StrategyOptions(init_lora_weights="gaussian"), True, False) == "gaussian"


def test_under_deepspeed_zero_1_2_the_calibrated_start_is_refused_and_auto_takes_plain_loftq():
    """The calibrated start runs when training starts, after `deepspeed.initialize` has taken the LoRA weights into
    its flat fp32 masters: writing the adapter then would be lost (issue 26, item 3)."""
    assert lora_init(StrategyOptions(), four_bit=True, shards_parameters=False, deepspeed=True) == "loftq"
    with pytest.raises(QLoRAPluginError, match="cannot run under DeepSpeed.*--init_lora_weights loftq"):
        lora_init(StrategyOptions(init_lora_weights="loftq_calibrated"), True, False, deepspeed=True)
    assert lora_init(StrategyOptions(init_lora_weights="loftq"), True, False, deepspeed=True) == "loftq"


@pytest.mark.parametrize("options, four_bit, shards, reason", [
    (StrategyOptions(init_lora_weights="loftq"), False, False, "base is 16-bit"),
    (StrategyOptions(init_lora_weights="loftq_calibrated"), False, False, "base is 16-bit"),
    (StrategyOptions(init_lora_weights="loftq_calibrated"), True, True, "FSDP"),
    (StrategyOptions(init_lora_weights="loftq", use_dora=True), True, False, "DoRA"),
    (StrategyOptions(init_lora_weights="loftq"), True, True, "FSDP"),
])
def test_explicit_loftq_where_it_cannot_run_is_refused(options, four_bit, shards, reason):
    with pytest.raises(QLoRAPluginError, match=reason) as err:
        lora_init(options, four_bit, shards)
    assert "--init_lora_weights default" in str(err.value)


def test_unknown_init_is_refused_with_the_choices():
    with pytest.raises(QLoRAPluginError, match="auto, loftq_calibrated, loftq, default, gaussian"):
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_plan_shows_the_start_and_plans_16_bit_beside_it_with_peft_start(tiny_models, capsys):
    from qlora_plugin.cli import main

    assert main(["plan", tiny_models["llama"], "--init_lora_weights", "loftq"]) == 0
    out = capsys.readouterr().out
    assert "qlora: compute" in out and "LoRA init loftq" in out.split("qlora: compute")[1].split("\n")[0]
    assert "LoRA init default" in out.split("lora: compute")[-1].split("\n")[0]
    assert main(["plan", tiny_models["llama"]]) == 0  # auto: the same choice as a training run
    assert "LoRA init loftq_calibrated" in capsys.readouterr().out.split("qlora: compute")[1].split("\n")[0]


def test_the_start_shows_its_progress(tiny_models, capsys):
    """The start takes seconds on an idle machine and minutes on a loaded one: a bar over the layers says how far
    it is (asked for by the training run unless `--disable_tqdm`); off by default."""
    from qlora_plugin.strategies.loftq import loftq_initialise

    model = wrap_with_lora(_four_bit(tiny_models["llama"]), StrategyOptions(init_lora_weights="default"), CPU)
    capsys.readouterr()
    facts = loftq_initialise(model, progress=True)
    err = capsys.readouterr().err
    assert "LoRA start (loftq): 100%" in err and f"{facts['layers']}/{facts['layers']}" in err, err
    loftq_initialise(model)
    assert "LoRA start" not in capsys.readouterr().err
