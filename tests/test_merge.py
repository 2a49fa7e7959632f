"""`qlora-plugin merge` fidelity: the merged model reproduces the 4-bit base + adapter that training used, far
closer than the usual merge into the original 16-bit weights, and it loads with nothing of ours installed."""

from __future__ import annotations

import json
import site
import sys
from pathlib import Path

import pytest

from conftest import DATA, TRAIN_FLAGS, run_command, run_python

from qlora_plugin import cli
from qlora_plugin.merge import fidelity
from qlora_plugin.quant.record import RECORD_FILE, quantization_record

BOUND = 1e-4  # max |logit difference|, merged model vs 4-bit base + adapter, fp32 (logits are of order 1-10)
NAIVE_FACTOR = 1000  # the naive merge's error must be at least this many times larger than ours


def bnb_config():
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float32)


def held_out_batch(model_dir):
    """Prompts + completions from the held-out split, tokenized as one padded batch."""
    from transformers import AutoTokenizer

    rows = [json.loads(line) for line in (DATA / "test.jsonl").read_text().splitlines()[:8]]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return tokenizer([r["prompt"] + r["completion"] for r in rows], return_tensors="pt", padding=True)


def logits(model, batch):
    import torch

    model.eval()
    with torch.no_grad():
        return model(**batch).logits[batch["attention_mask"].bool()]


def crafted_adapter(base, out, four_bit=True, **lora):
    """A peft adapter on the 4-bit (or 16-bit) base with every trainable tensor perturbed, so each part counts."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    quantization = {"quantization_config": bnb_config()} if four_bit else {}
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, **quantization)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM", **lora))
    torch.manual_seed(1)
    for param in model.parameters():
        if param.requires_grad:
            param.data += 0.05 * torch.randn_like(param)
    model.save_pretrained(out)
    (Path(out) / RECORD_FILE).write_text(json.dumps(quantization_record(model)))
    return str(out)


@pytest.fixture(scope="session")
def trained_adapter(tiny_models, tmp_path_factory):
    """A real `--strategy qlora` run (2 steps, high lr so the adapter matters), saving a checkpoint at step 2."""
    out = tmp_path_factory.mktemp("merge") / "run"
    flags = [f for f in TRAIN_FLAGS if f not in ("--max_steps", "3", "--save_strategy", "no")]
    proc = run_python(["-m", "trl.scripts.sft", "--model_name_or_path", tiny_models["llama"], "--dataset_name",
                       str(DATA), "--output_dir", str(out), "--strategy", "qlora", "--lora_r", "8",
                       "--learning_rate", "1e-2", "--max_steps", "2", "--save_strategy", "steps", "--save_steps",
                       "2", "--dtype", "float32", *flags], out.parent)  # fp32 on every CPU, bf16-native or not
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_a_base_given_by_relative_path_merges_from_any_folder(tiny_models, tmp_path):
    """The adapter records a local base by its absolute, resolved path (not `base` as typed, relative to where
    training ran), so `merge` from another folder needs no `--base`; a Hub id is recorded as it is."""
    import shutil

    project = tmp_path / "project"
    shutil.copytree(tiny_models["llama"], project / "base")
    proc = run_python(["-m", "trl.scripts.sft", "--model_name_or_path", "base", "--dataset_name", str(DATA),
                       "--output_dir", "run", "--strategy", "qlora", "--lora_r", "4", *TRAIN_FLAGS], project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recorded = json.loads((project / "run" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str((project / "base").resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = run_command(["qlora-plugin", "merge", "--adapter", str(project / "run"), "--out", "merged"], elsewhere)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (elsewhere / "merged" / "model.safetensors").is_file()

    from qlora_plugin.training.pipeline import record_local_base

    class HubModel:
        name_or_path = "Qwen/Qwen2.5-7B"  # no such folder here: a Hub id

    hub = HubModel()
    record_local_base(hub)
    assert hub.name_or_path == "Qwen/Qwen2.5-7B"


@pytest.mark.slow
def test_training_records_the_quantization_beside_every_adapter(trained_adapter):
    for folder in (trained_adapter, trained_adapter / "checkpoint-2"):
        assert (folder / "adapter_model.safetensors").is_file()
        record = json.loads((folder / RECORD_FILE).read_text())
        assert record["load_in_4bit"] is True
        assert record["bnb_4bit_quant_type"] == "nf4" and record["bnb_4bit_use_double_quant"] is True
        assert record["blocksize"] == 64 and record["weight_dtype"] == "float32" and record["layers_4bit"] == 14


@pytest.mark.parametrize("arch", ["llama_odd", "gpt2"])
@pytest.mark.slow
def test_requantizing_the_base_reproduces_the_4bit_weights_bit_for_bit(arch, tiny_models):
    """The claim merge rests on, on odd widths (blocks span rows) and on GPT-2's transposed Conv1D weights."""
    import torch
    from bitsandbytes.functional import dequantize_4bit
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from qlora_plugin.merge.merging import model_layout, nf4_roundtrip
    from qlora_plugin.models.model_config import load_config

    model = AutoModelForCausalLM.from_pretrained(tiny_models[arch], quantization_config=bnb_config(),
                                                 dtype=torch.float32)
    record = quantization_record(model)
    layout = model_layout(load_config(tiny_models[arch]), record)
    stored = load_file(Path(tiny_models[arch]) / "model.safetensors")
    assert len(layout.quantized) == record["layers_4bit"] > 0
    for name in layout.quantized:
        layer = model.get_submodule(name.removesuffix(".weight"))
        weight = stored[name].T if name in layout.conv1d else stored[name]
        assert torch.equal(nf4_roundtrip(weight, record), dequantize_4bit(layer.weight.data, layer.weight.quant_state))


CASES = {
    # trained by the strategy: every linear layer of the blocks, r=8
    "llama, trained": None,
    # Conv1D weights stored (in, out), tied embeddings, LoRA on the embedding (output must untie)
    "gpt2, Conv1D + tied embedding LoRA": dict(arch="gpt2", target_modules=["c_attn", "c_proj", "c_fc", "wte"]),
    # DoRA, rank-stabilised scaling, lm_head trained in full (modules_to_save)
    "llama, DoRA + rslora + modules_to_save": dict(arch="llama", target_modules="all-linear", use_dora=True,
                                                   use_rslora=True, modules_to_save=["lm_head"]),
}


@pytest.fixture(scope="session")
def merged(request, tiny_models, trained_adapter, tmp_path_factory):
    """Per case: (base folder, adapter folder, merged folder)."""
    results = {}

    def get(case):
        if case not in results:
            spec = CASES[case]
            root = tmp_path_factory.mktemp("merged")
            if spec is None:
                base, adapter = tiny_models["llama"], str(trained_adapter)
            else:
                spec = dict(spec)
                base = tiny_models[spec.pop("arch")]
                adapter = crafted_adapter(base, root / "adapter", **spec)
            out = root / "model"
            assert cli.main(["merge", "--adapter", adapter, "--out", str(out), "--dtype", "float32"]) == 0
            results[case] = (base, adapter, out)
        return results[case]

    return get


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.slow
@pytest.mark.floor
def test_merged_model_matches_the_4bit_model_it_was_trained_against(case, merged, capsys):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qlora_plugin import make_cpu_inference_safe

    base, adapter, out = merged(case)
    batch = held_out_batch(base)
    trained = make_cpu_inference_safe(PeftModel.from_pretrained(  # bitsandbytes' generic path, as in training
        AutoModelForCausalLM.from_pretrained(base, quantization_config=bnb_config(), dtype=torch.float32), adapter))
    reference = logits(trained, batch)
    with trained.disable_adapter():
        effect = (logits(trained, batch) - reference).abs().max().item()  # what a merge that lost the adapter misses
    ours = (logits(AutoModelForCausalLM.from_pretrained(out), batch) - reference).abs().max().item()
    naive_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    naive = (logits(naive_model.merge_and_unload(), batch) - reference).abs().max().item()
    with capsys.disabled():
        print(f"\n[merge fidelity] {case}: max |logit diff| ours {ours:.2e}, naive {naive:.2e}; adapter effect "
              f"{effect:.2e}, logit scale {reference.abs().max().item():.2f}")
    assert ours < BOUND
    assert effect > NAIVE_FACTOR * ours
    assert naive > NAIVE_FACTOR * ours


@pytest.mark.slow
def test_adapter_trained_on_a_16bit_base_merges_into_the_original_weights(tiny_models, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = tiny_models["phi3"]
    adapter = crafted_adapter(base, tmp_path / "adapter", four_bit=False, target_modules="all-linear")
    assert json.loads((Path(adapter) / RECORD_FILE).read_text())["load_in_4bit"] is False
    assert cli.main(["merge", "--adapter", adapter, "--out", str(tmp_path / "model")]) == 0
    batch = held_out_batch(base)
    reference = logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter), batch)
    assert (logits(AutoModelForCausalLM.from_pretrained(tmp_path / "model"), batch) - reference).abs().max() < BOUND


@pytest.mark.slow
def test_output_is_a_plain_safetensors_model_that_loads_without_the_plugin(merged, tmp_path):
    base, _, out = merged("gpt2, Conv1D + tied embedding LoRA")
    names = sorted(p.name for p in out.iterdir())
    assert names == ["chat_template.jinja", "config.json", "generation_config.json", "merge_report.json",
                     "model.safetensors", "qlora_plugin_merge.json", "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float32" and "quantization_config" not in config
    assert config["tie_word_embeddings"] is False  # the embedding changed, lm_head did not: no longer tied
    # -S: no .pth files run, so neither the plugin's start-up hook nor its editable install is on the path.
    script = (
        "import importlib.util, json, sys; sys.path.append(sys.argv[1])\n"
        "assert importlib.util.find_spec('qlora_plugin') is None\n"
        "import torch; from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[2]).eval(); t = AutoTokenizer.from_pretrained(sys.argv[2])\n"
        "with torch.no_grad(): x = m(**t('Add 2 and 4. 6', return_tensors='pt')).logits\n"
        "print(json.dumps({'plugin': 'qlora_plugin' in sys.modules, 'logits': x[0, -1, :5].tolist()}))\n"
    )
    proc = run_python(["-S", "-c", script, site.getsitepackages()[0], str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loaded["plugin"] is False

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)
    with torch.no_grad():
        here = model(**tokenizer("Add 2 and 4. 6", return_tensors="pt")).logits[0, -1, :5]
    assert torch.allclose(torch.tensor(loaded["logits"]), here, atol=1e-5)


@pytest.mark.slow
def test_sharded_bfloat16_output_with_index(merged, tmp_path):
    import torch
    from safetensors.torch import load_file

    _, adapter, full = merged("llama, trained")
    out = tmp_path / "sharded"
    assert cli.main(["merge", "--adapter", adapter, "--out", str(out), "--dtype", "bfloat16",
                     "--max_shard_size", "100KB"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and sorted(p.name for p in out.glob("*.safetensors")) == shards
    reference = load_file(full / "model.safetensors")
    tensors = {k: v for shard in shards for k, v in load_file(out / shard).items()}
    assert tensors.keys() == reference.keys() == index["weight_map"].keys()
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert all(torch.equal(tensors[k], reference[k].to(torch.bfloat16)) for k in tensors)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-s"]))


@pytest.mark.slow
def test_merge_checks_its_fidelity_and_reports_it(trained_adapter, tmp_path, capsys):
    """`merge` measures the merged model against the adapter on its 4-bit base, beside the output dtype's rounding
    floor and the naive merge; the gate is the mean KL against the floor."""
    out = tmp_path / "model"
    assert cli.main(["merge", "--adapter", str(trained_adapter), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "fidelity against the adapter on its trained base (12 prompts" in printed and "check: passed" in printed
    report = json.loads((out / "merge_report.json").read_text())
    assert report["passed"] is True and report["output_dtype"] == "float32" and report["device"] == "cpu"
    assert report["positions"] >= 300  # a dozen prompts of a few dozen tokens each
    ours, naive, floor = report["merge"], report["naive_merge_into_16bit_base"], report["rounding_floor"]
    assert ours["max_relative_logit_diff"] < 1e-4 and ours["greedy_agreement"] == 1.0
    assert ours["mean_kl"] <= report["thresholds"]["max_mean_kl"] == pytest.approx(
        fidelity.KL_FACTOR * floor["mean_kl"] + fidelity.KL_TOLERANCE)
    assert naive["max_relative_logit_diff"] > 100 * ours["max_relative_logit_diff"]
    assert naive["mean_kl"] > 100 * report["thresholds"]["max_mean_kl"]


@pytest.fixture(scope="module")
def crafted_merge(tiny_models, tmp_path_factory):
    """A crafted 4-bit adapter on the tiny Llama and its merge (unchecked): the check's inputs, made in seconds."""
    root = tmp_path_factory.mktemp("crafted")
    adapter = crafted_adapter(tiny_models["llama"], root / "adapter", target_modules="all-linear")
    assert cli.main(["merge", "--adapter", adapter, "--out", str(root / "bf16"), "--dtype", "bfloat16",
                     "--no_check"]) == 0
    return tiny_models["llama"], adapter, root / "bf16"


def test_the_floor_measures_the_output_dtypes_rounding(crafted_merge):
    """bf16 output: the merge sits at the floor (the reference with every weight off by bf16 rounding), not 0."""
    base, adapter, merged = crafted_merge
    report = fidelity.check(adapter, str(merged), base, quantization_settings(adapter), "bfloat16")
    floor, ours = report["rounding_floor"], report["merge"]
    assert report["passed"] and floor["mean_kl"] > 1e-7
    assert 0.1 < ours["mean_kl"] / floor["mean_kl"] < fidelity.KL_FACTOR
    assert report["naive_merge_into_16bit_base"]["mean_kl"] > 10 * report["thresholds"]["max_mean_kl"]


def quantization_settings(adapter):
    from qlora_plugin.merge.merging import quant_settings
    from qlora_plugin.merge.inputs import load_adapter

    return quant_settings(load_adapter(adapter))


def test_the_check_runs_every_model_and_the_batch_on_one_device(crafted_merge, monkeypatch):
    """On a machine with a GPU, bitsandbytes puts a 4-bit model loaded without a device map on the GPU; the batch
    stayed on the CPU (device mismatch). Faked here: the check's device is a GPU, every load records the device
    map it was given (and runs on the CPU), the batch records where it was sent."""
    import torch
    from transformers import AutoModelForCausalLM, BatchEncoding

    base, adapter, merged = crafted_merge
    loads, moves = [], []
    real_load = AutoModelForCausalLM.from_pretrained.__func__

    def load(cls, *args, **kwargs):
        loads.append(kwargs.pop("device_map", None))
        return real_load(cls, *args, device_map={"": "cpu"}, **kwargs)

    def move(self, device, *args, **kwargs):
        moves.append(torch.device(device))
        return self

    gpu = torch.device("cuda", 0)
    with monkeypatch.context() as fake:  # torch with a GPU: the check runs there
        fake.setattr(torch.cuda, "is_available", lambda: True)
        fake.setattr(torch.cuda, "current_device", lambda: 0)
        assert fidelity.check_device() == gpu
    monkeypatch.setattr(fidelity, "check_device", lambda: gpu)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(load))
    monkeypatch.setattr(BatchEncoding, "to", move)
    report = fidelity.check(adapter, str(merged), base, quantization_settings(adapter), "bfloat16")
    assert loads == [{"": gpu}] * 3  # the reference, the merge, the naive merge
    assert moves == [gpu] and report["device"] == "cuda:0"


def test_a_check_too_large_for_memory_is_refused_before_writing(crafted_merge, tmp_path, capsys, monkeypatch):
    _, adapter, _ = crafted_merge
    monkeypatch.setattr(fidelity, "available_bytes", lambda device: 1000)
    out = tmp_path / "merged"
    assert cli.main(["merge", "--adapter", adapter, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "The fidelity check needs about" in err and "--no_check" in err and list(tmp_path.iterdir()) == []
    assert cli.main(["merge", "--adapter", adapter, "--out", str(out), "--no_check"]) == 0


def test_the_naive_merge_is_skipped_above_its_size_with_the_reason(crafted_merge, monkeypatch):
    base, adapter, merged = crafted_merge
    monkeypatch.setattr(fidelity, "NAIVE_MAX_PARAMS", 1000)
    report = fidelity.check(adapter, str(merged), base, quantization_settings(adapter), "bfloat16")
    assert "naive_merge_into_16bit_base" not in report and "the naive merge is shown up to" in report["naive_skipped"]
    assert "naive merge not shown" in fidelity.format_table(report) and report["passed"]


@pytest.mark.slow
def test_a_merge_that_fails_its_check_is_kept_apart(trained_adapter, tmp_path, capsys):
    """Merged as fp4 while training used nf4: not what was trained. Not written to --out; kept, marked, explained."""
    out = tmp_path / "model"
    code = cli.main(["merge", "--adapter", str(trained_adapter), "--out", str(out), "--bnb_4bit_quant_type", "fp4"])
    err = capsys.readouterr().err
    assert code == 2 and "failed its fidelity check" in err and "--no_check skips the check" in err
    assert not out.exists()
    report = json.loads((tmp_path / "model.incomplete" / "merge_report.json").read_text())
    assert report["passed"] is False and report["failures"]


@pytest.mark.slow
def test_no_check_and_eval_data(trained_adapter, tmp_path, capsys):
    out = tmp_path / "unchecked"
    assert cli.main(["merge", "--adapter", str(trained_adapter), "--out", str(out), "--no_check"]) == 0
    assert not (out / "merge_report.json").exists() and "fidelity" not in capsys.readouterr().out
    checked = tmp_path / "checked"
    assert cli.main(["merge", "--adapter", str(trained_adapter), "--out", str(checked), "--eval_data",
                     str(DATA / "test.jsonl")]) == 0
    assert json.loads((checked / "merge_report.json").read_text())["prompts"] == 16  # prompt+completion rows, up to 16
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"label": 1}\n')
    assert cli.main(["merge", "--adapter", str(trained_adapter), "--out", str(tmp_path / "never"), "--eval_data",
                     str(bad)]) == 2
    assert "has no usable rows" in capsys.readouterr().err and not (tmp_path / "never").exists()


def test_another_base_of_the_same_shape_fails_the_check(crafted_merge, tmp_path, capsys):
    """--base with the first two blocks swapped: every tensor fits, but it is not the base the adapter records,
    which the check rebuilds the trained model from."""
    import shutil

    from safetensors.torch import load_file, save_file

    base, adapter, _ = crafted_merge
    other = Path(shutil.copytree(base, tmp_path / "other"))
    tensors = load_file(other / "model.safetensors")
    save_file({k.replace("layers.0.", "layers.#.").replace("layers.1.", "layers.0.").replace("layers.#.", "layers.1."):
               v for k, v in tensors.items()}, other / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "merged"
    assert cli.main(["merge", "--adapter", adapter, "--base", str(other), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "failed its fidelity check (mean KL" in err and f"the adapter on {base}" in err and not out.exists()
