"""Quantization backends (`qlora_plugin/quant/backends/`): the registry's choice, the single check of a
quantization asked for elsewhere, and LoRA on a bitsandbytes 8-bit base (`--strategy lora-int8`) on the CPU: load,
forward and backward, plan bytes, the record, resume checks and merge's dequantization. The end-to-end run
(train, resume, merge) is slow-marked."""

from __future__ import annotations

import json

import pytest

from qlora_plugin.core.errors import QLoRAPluginError
from qlora_plugin.core.options import build_options
from qlora_plugin.quant.backends import (backend_for, backend_named, backend_of_model, check_asked_quantization,
                                         model_facts, registered)
from qlora_plugin.strategies.builtin import LORA, LORA_INT8, QLORA


def options_of(strategy, **explicit):
    return build_options(dict(strategy.option_defaults), explicit)


def test_each_builtin_strategy_picks_its_backend():
    assert list(registered()) == ["bnb_4bit", "bnb_int8"]
    assert backend_for(options_of(QLORA)).name == "bnb_4bit"
    assert backend_for(options_of(LORA_INT8)).name == "bnb_int8"
    assert backend_for(options_of(LORA)) is None
    # a backend named by the user wins over the preset, and load_in_4bit follows it
    chosen = options_of(QLORA, quant_backend="bnb_int8")
    assert backend_for(chosen).name == "bnb_int8" and chosen.load_in_4bit is False
    assert backend_for(options_of(LORA_INT8, load_in_4bit=True)).name == "bnb_4bit"


def test_load_in_4bit_and_an_int8_backend_contradict():
    with pytest.raises(QLoRAPluginError, match="`load_in_4bit` true contradicts `quant_backend` bnb_int8"):
        options_of(QLORA, load_in_4bit=True, quant_backend="bnb_int8")


def test_an_unknown_quant_backend_is_refused():
    with pytest.raises(QLoRAPluginError, match="`quant_backend` must be one of bnb_4bit, bnb_int8, none; got 'gptq'"):
        backend_for(options_of(LORA, quant_backend="gptq"))


def test_a_quantization_config_of_another_backend_is_refused_in_one_place():
    from transformers import BitsAndBytesConfig

    eight, four = BitsAndBytesConfig(load_in_8bit=True), BitsAndBytesConfig(load_in_4bit=True)
    with pytest.raises(QLoRAPluginError, match="load_in_8bit contradicts the strategy .4-bit base.*strategy lora-int8"):
        check_asked_quantization(eight, options_of(QLORA))
    with pytest.raises(QLoRAPluginError, match="load_in_4bit contradicts the strategy .8-bit base.*--strategy qlora"):
        check_asked_quantization(four, options_of(LORA_INT8))
    with pytest.raises(QLoRAPluginError, match="load_in_8bit contradicts the strategy .16-bit base"):
        check_asked_quantization(eight, options_of(LORA))
    check_asked_quantization(eight, options_of(LORA_INT8))  # the run's own backend: the user's config wins
    check_asked_quantization({"quant_method": "gptq", "bits": 4}, options_of(QLORA))  # another library: used as is
    with pytest.raises(QLoRAPluginError, match="`--load_in_8bit` contradicts `--strategy`.*--strategy lora-int8"):
        check_asked_quantization(None, flag="load_in_8bit")


def test_4bit_options_set_for_an_int8_base_are_refused_not_ignored():
    from qlora_plugin.integration.activation import validate
    from qlora_plugin.core.request import StrategyRequest
    from qlora_plugin.training.loading import resolve

    for check in (validate, resolve):  # the command line / YAML, and the Python API
        with pytest.raises(QLoRAPluginError, match="`bnb_4bit_quant_type` acts on 4-bit layers only, and `--strategy "
                           "lora-int8` trains on an 8-bit base"):
            check(StrategyRequest("lora-int8", {"bnb_4bit_quant_type": "fp4"}))
        with pytest.raises(QLoRAPluginError, match="`quantized_cache` acts on 4-bit layers only"):
            check(StrategyRequest("lora-int8", {"quantized_cache": True}))
        check(StrategyRequest("lora-int8", {"quantized_cache": False, "lora_r": 8}))  # turning it off is harmless
        check(StrategyRequest("qlora", {"bnb_4bit_quant_type": "fp4"}))


def test_lora_int8_is_offered_as_an_8bit_base_and_typos_of_qlora_do_not_reach_it():
    from qlora_plugin.core.strategy import unknown_strategy_error

    strategies = {s.name: s for s in (QLORA, LORA_INT8, LORA)}
    near = str(unknown_strategy_error("lora-int4", strategies))
    assert "Did you mean 'lora-int8' (8-bit base) or 'lora' (16-bit base)?" in near
    assert "Did you mean 'qlora' (4-bit base) or 'lora' (16-bit base)?" in str(unknown_strategy_error("qlroa",
                                                                                                     strategies))


@pytest.fixture
def int8_model(tiny_models):
    """The tiny llama loaded as `--strategy lora-int8` loads it (fp32, so every CPU computes the same)."""
    from trl.trainer.utils import create_model_from_path

    from qlora_plugin.quant.config import model_init_kwargs
    from qlora_plugin.ecosystem.runtime import Runtime

    options = options_of(LORA_INT8)
    kwargs = model_init_kwargs(options, {"dtype": "float32"}, Runtime("cpu", False, "none"))
    assert kwargs["quantization_config"].load_in_8bit and kwargs["quantization_config"].llm_int8_threshold == 6.0
    return create_model_from_path(tiny_models["llama"], **kwargs), options


def test_an_int8_base_trains_with_lora_on_cpu(int8_model):
    import torch

    from qlora_plugin.ecosystem.runtime import Runtime
    from qlora_plugin.strategies.adapters import wrap_with_lora

    model, options = int8_model
    backend = backend_of_model(model)
    assert backend.name == "bnb_int8" and len(backend.quantized_layers(model)) == 14  # 7 per block, 2 blocks
    assert backend.quantized_layers(model)[0].weight.dtype == torch.int8
    model = wrap_with_lora(model, options, Runtime("cpu", False, "none"))
    # auto: no LoftQ start for an 8-bit base, and the summary says why
    assert model.qlora_lora_init == {"method": "default", "note": "auto: no LoftQ start for this 8-bit base "
                                     "(peft's LoftQ corrects 4-bit error only)"}
    ids = torch.randint(0, 100, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(".lora_" in n for n in grads)
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)  # B starts at 0
    facts = model_facts(model)
    assert facts["backend"] == "bnb_int8" and facts["layers_quantized"] == 14
    assert 8 < facts["bits_per_param"] < 9  # int8 codes + an fp32 scale per row of 64 or 128
    line = backend.summary_line(facts)
    assert line.startswith("8-bit base : 14 linear layers in int8 (LLM.int8(), outlier threshold 6;")
    with pytest.raises(QLoRAPluginError, match="the base is 8-bit, and peft's LoftQ corrects 4-bit"):
        wrap_with_lora(int8_model[0], options_of(LORA_INT8, init_lora_weights="loftq"), Runtime("cpu", False, "none"))


def test_int8_dequantization_is_what_merge_rebuilds_from_the_original_weights(int8_model, tiny_models):
    import torch
    from safetensors.torch import load_file

    from qlora_plugin.quant.record import quantization_record

    model, _ = int8_model
    backend = backend_named("bnb_int8")
    record = quantization_record(model)
    assert record == {"version": 1, "load_in_4bit": False, "load_in_8bit": True, "llm_int8_threshold": 6.0,
                      "weight_dtype": "float32", "llm_int8_skip_modules": None, "layers_quantized": 14,
                      "quant_backend": "bnb_int8"}
    original = load_file(f"{tiny_models['llama']}/model.safetensors")
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        layer, weight = model.get_submodule(name), original[f"{name}.weight"]
        held = backend.dequantize(layer)
        assert torch.equal(backend.roundtrip(weight, record), held)  # bit for bit what training held
        step = weight.abs().amax(dim=1, keepdim=True) / 127  # int8 absmax per row: within half a step, plus the
        assert ((held - weight).abs() <= 0.55 * step).all()  # fp16 rounding of the weight bitsandbytes starts from
        assert not torch.equal(held, weight)


def test_plan_counts_int8_codes_and_row_scales_as_a_real_load_holds(int8_model, tiny_models):
    from qlora_plugin.models.model_config import load_config
    from qlora_plugin.plan.estimate import parameter_costs
    from qlora_plugin.plan.skeleton import skeleton

    model, options = int8_model
    costs = parameter_costs(skeleton(load_config(tiny_models["llama"]), LORA_INT8, options, "float32"), options)
    layers = backend_named("bnb_int8").quantized_layers(model)
    assert costs["layers_4bit"] == len(layers)  # the plan's count of quantized layers
    assert costs["packed"] == sum(layer.weight.numel() * layer.weight.element_size() for layer in layers)
    scales = [getattr(layer.weight, "SCB", None) for layer in layers]
    assert costs["constants"] == sum(s.numel() * s.element_size() for s in scales)
    four = build_options({}, {})
    qlora = parameter_costs(skeleton(load_config(tiny_models["llama"]), QLORA, four, "float32"), four)
    assert qlora["packed"] * 2 == costs["packed"]  # half a byte per weight against one


def test_resuming_across_backends_is_refused_before_loading(tmp_path):
    from qlora_plugin.training.checkpoint_checks import check_before_load

    folder = tmp_path / "checkpoint-2"
    folder.mkdir()
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    (folder / "qlora_plugin_quantization.json").write_text(json.dumps(
        {"version": 1, "load_in_4bit": False, "load_in_8bit": True, "quant_backend": "bnb_int8"}))
    with pytest.raises(QLoRAPluginError, match="with an 8-bit base .--strategy lora-int8.; this run has a 16-bit"):
        check_before_load(str(folder), options_of(LORA), own_quantization=True, own_adapter=False)
    with pytest.raises(QLoRAPluginError, match="with an 8-bit base .--strategy lora-int8.; this run has a 4-bit"):
        check_before_load(str(folder), options_of(QLORA), own_quantization=True, own_adapter=False)
    check_before_load(str(folder), options_of(LORA_INT8), own_quantization=True, own_adapter=False)


def _int8_record(folder, **changes) -> dict:
    record = {"version": 1, "load_in_4bit": False, "load_in_8bit": True, "quant_backend": "bnb_int8",
              "weight_dtype": "float32", "layers_quantized": 14, **changes}
    (folder / "qlora_plugin_quantization.json").write_text(json.dumps(record))
    return record


def test_merge_reads_an_int8_record_and_refuses_4bit_flags_for_it(tmp_path):
    from qlora_plugin.merge.inputs import Adapter
    from qlora_plugin.merge.merging import quant_settings

    record = _int8_record(tmp_path)
    adapter = Adapter(str(tmp_path), {})
    assert quant_settings(adapter) == record
    with pytest.raises(QLoRAPluginError, match="trained on an 8-bit base.*--bnb_4bit_quant_type.*do not apply"):
        quant_settings(adapter, quant_type="nf4")


def test_merge_refuses_a_record_of_an_unknown_backend(tmp_path):
    from qlora_plugin.merge.inputs import Adapter
    from qlora_plugin.merge.merging import quant_settings

    _int8_record(tmp_path, quant_backend="hqq")
    adapter = Adapter(str(tmp_path), {})
    with pytest.raises(QLoRAPluginError, match="`quant_backend` is 'hqq', which merge cannot rebuild"):
        quant_settings(adapter)


@pytest.mark.slow
def test_lora_int8_trains_resumes_and_merges(tiny_models, tmp_path):
    """`lora-int8` end to end in-process: train 2 steps (checkpoint), resume to 3, merge the adapter into the
    dequantized int8 base; the fidelity gate passes and the merged model is the adapter on the 8-bit base."""
    from datasets import load_dataset
    from trl import SFTConfig

    from conftest import DATA
    from qlora_plugin import make_trainer
    from qlora_plugin.merge.merging import merge

    def config(steps):
        return SFTConfig(output_dir=str(tmp_path / "run"), max_steps=steps, per_device_train_batch_size=4,
                         report_to="none", use_cpu=True, logging_steps=1, save_strategy="steps", save_steps=2,
                         max_length=64, learning_rate=1e-2)

    data = load_dataset(str(DATA))["train"]
    trainer = make_trainer("lora-int8", model=tiny_models["llama"], args=config(2), train_dataset=data,
                           options={"lora_r": 8, "bnb_4bit_compute_dtype": "float32"})  # fp32 on every CPU
    assert backend_of_model(trainer.model).name == "bnb_int8"
    trainer.train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert json.loads((checkpoint / "qlora_plugin_quantization.json").read_text())["quant_backend"] == "bnb_int8"
    report = json.loads((tmp_path / "run" / "qlora_plugin_report.json").read_text())
    assert report["quantization"]["backend"] == "bnb_int8"

    resumed = make_trainer("lora-int8", model=tiny_models["llama"], args=config(3), train_dataset=data,
                           options={"lora_r": 8, "bnb_4bit_compute_dtype": "float32"})  # fp32 on every CPU
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 3
    resumed.save_model()  # as TRL's script does after training

    summary = merge(str(tmp_path / "run"), str(tmp_path / "merged"), dtype="float32")
    from qlora_plugin.merge.fidelity import format_table

    print(format_table(summary["fidelity"]))
    assert summary["quantization"] == {"quant_backend": "bnb_int8", "weight_dtype": "float32"}
    assert summary["requantized_layers"] == 14 and summary["fidelity"]["passed"], summary["fidelity"]
    naive = summary["fidelity"]["naive_merge_into_16bit_base"]["mean_kl"]
    assert summary["fidelity"]["merge"]["mean_kl"] < naive  # the int8 rounding the adapter learnt on is kept


@pytest.mark.slow
def test_lora_int8_through_trls_script_and_the_merge_command(tiny_models, tmp_path):
    """As a user runs it: `python -m trl.scripts.sft ... --strategy lora-int8`, then `qlora-plugin merge`. The
    script's own `get_quantization_config(model_args)` (8-bit, from the filled-in `ModelConfig`) is recognised as
    the strategy's, not as a contradicting config."""
    from conftest import DATA, TRAIN_FLAGS, run_command, run_python

    proc = run_python(["-m", "trl.scripts.sft", "--model_name_or_path", tiny_models["llama"], "--dataset_name",
                       str(DATA), "--output_dir", "run", "--strategy", "lora-int8", "--lora_r", "8", *TRAIN_FLAGS],
                      tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = proc.stdout + proc.stderr
    assert "8-bit base : 14 linear layers in int8" in said and "instead of the strategy's" not in said
    assert json.loads((tmp_path / "run" / "qlora_plugin_quantization.json").read_text())["quant_backend"] == "bnb_int8"
    proc = run_command(["qlora-plugin", "merge", "--adapter", "run", "--out", "merged"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "into the dequantized int8 base (14 layers re-quantized)" in proc.stdout
    assert json.loads((tmp_path / "merged" / "merge_report.json").read_text())["passed"] is True
