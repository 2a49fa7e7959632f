"""`qlora-plugin plan --trainer`: DPO, KTO, reward, GRPO and RLOO batches, reference and generation passes, and
`--memory_budget` for the trainers the plan counts (issue 28). All on the meta device: seconds."""

from __future__ import annotations

import dataclasses
import json

import pytest

from qlora_plugin.core.errors import QLoRAPluginError
from qlora_plugin.models.model_config import load_config
from qlora_plugin.core.options import StrategyOptions, build_options
from qlora_plugin.plan.activations import eval_transient
from qlora_plugin.plan.budget import choose
from qlora_plugin.plan.estimate import PlanSettings, plan_strategy
from qlora_plugin.plan.skeleton import skeleton
from qlora_plugin.plan.trainer_passes import TrainerPasses, peaks_for, plan_trainer
from qlora_plugin.plugin.manager import get_plugin_manager, get_strategy
from qlora_plugin.core.trainer_kinds import KINDS
from qlora_plugin.training.trainer_setup import check_kind_options, options_for_kind



@pytest.fixture(scope="module")
def small_config(tmp_path_factory) -> str:
    """Llama-shaped, small enough for plans in a second: hidden 512, 4 layers, 8 heads (4 KV heads), vocab 32000."""
    from transformers import LlamaConfig

    folder = tmp_path_factory.mktemp("llama-small")
    LlamaConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def setup(small_config):
    pm = get_plugin_manager()
    strategy = get_strategy(pm, "qlora")
    options = build_options(dict(strategy.option_defaults), {"init_lora_weights": "default"})
    return load_config(small_config), strategy, options, pm


def _plan(setup, passes: TrainerPasses, **settings):
    config, strategy, options, pm = setup
    settings = PlanSettings(**{"batch_size": 2, "seq_len": 256, "device": "cuda", **settings})
    return plan_trainer(config, "qlora", strategy, options, settings, passes, pm)


def test_dpo_trains_chosen_and_rejected_as_twice_the_rows_and_counts_its_reference(setup):
    config, strategy, options, pm = setup
    dpo = _plan(setup, TrainerPasses("dpo"))
    sft_at_rows = plan_strategy(config, "qlora", strategy, options,
                                PlanSettings(batch_size=4, seq_len=256, device="cuda"), pm)
    for name in ("weights", "optimizer", "activations", "loss"):
        assert dpo.components[name] == sft_at_rows.components[name], name
    assert dpo.details["forward_rows"] == 4 and dpo.details["batch_size"] == 2
    # the reference pass: the no-grad forward of the same 4 rows, with what the fused head keeps beside it
    model = skeleton(config, strategy, options, "bfloat16", pm, device="cuda")
    assert dpo.details["reference_pass_bytes"] == eval_transient(model, 4, 256, "cuda")["total"] > 0
    assert "reference" in dpo.components and dpo.total_bytes >= sft_at_rows.total_bytes
    precomputed = _plan(setup, TrainerPasses("dpo", precompute_ref=True))
    assert precomputed.details["reference_pass_bytes"] == precomputed.components["reference"] == 0
    assert "precompute" in precomputed.details["reference_how"]


def test_dpo_reference_adds_what_it_holds_beyond_the_backward(setup):
    """Without gradient checkpointing the backward's transient is small: the reference's forward, beside the
    policy's saved activations, raises the peak."""
    plan = _plan(setup, TrainerPasses("dpo"), gradient_checkpointing=False, seq_len=1024)
    assert plan.components["reference"] > 0
    assert plan.total_bytes == sum(plan.components.values())


def test_kto_is_unpaired_and_reward_has_no_lm_head(setup):
    kto, sft = _plan(setup, TrainerPasses("kto")), _plan(setup, TrainerPasses("sft"))
    assert kto.details["forward_rows"] == 2 and kto.components["activations"] == sft.components["activations"]
    assert kto.details["reference_pass_bytes"] > 0
    reward = _plan(setup, TrainerPasses("reward"))
    dpo = _plan(setup, TrainerPasses("dpo"))
    assert reward.details["forward_rows"] == 4 and reward.components["loss"] == 0
    assert dpo.components["loss"] > 0 or dpo.details["loss_path"] != reward.details["loss_path"]
    assert "classification" in reward.details["loss_path"]
    assert dpo.components["weights"] - reward.components["weights"] == 32000 * 512 * 2  # bf16 lm_head, untied
    assert reward.components["reference"] == 0 and "reference_how" not in reward.details


def test_grpo_counts_its_generation_batch_and_the_kv_cache(setup):
    passes = TrainerPasses("grpo", max_completion_length=256, num_generations=4, steps_per_generation=2)
    plan = _plan(setup, passes, batch_size=4, seq_len=128)
    generation = plan.details["generation"]
    assert generation["rows"] == 8  # batch x steps_per_generation
    # 4 layers x (k, v) x 4 KV heads x 64 dims, bf16, 8 rows x (128 + 256) tokens
    assert generation["kv_cache_bytes"] == 8 * (128 + 256) * 4 * 2 * 4 * 64 * 2
    assert plan.details["tokens_per_row"] == 384 and plan.details["forward_rows"] == 4
    assert plan.details["reference_how"].startswith("none")  # GRPO's default beta is 0
    longer = _plan(setup, dataclasses.replace(passes, steps_per_generation=16), batch_size=4, seq_len=128)
    assert longer.components["generation"] > plan.components["generation"]
    assert longer.total_bytes - plan.total_bytes == longer.components["generation"] - plan.components["generation"]
    rloo = _plan(setup, TrainerPasses("rloo", max_completion_length=256), batch_size=4, seq_len=128)
    assert rloo.details["reference_pass_bytes"] > 0  # RLOO's default beta is 0.05
    with pytest.raises(QLoRAPluginError, match="multiple of num_generations 8"):
        _plan(setup, TrainerPasses("grpo"), batch_size=2)


def test_plan_cli_trainer_flags(small_config, capsys):
    from qlora_plugin.cli import main

    assert main(["plan", small_config, "--strategy", "qlora", "--trainer", "grpo", "--seq-len", "128",
                 "--max_completion_length", "256", "--batch-size", "8", "--device", "cuda", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["components"]["generation"] >= 0 and plan["details"]["generation"]["completion_tokens"] == 256
    assert main(["plan", small_config, "--strategy", "qlora", "--trainer", "dpo", "--device", "cuda"]) == 0
    out = capsys.readouterr().out
    assert "trainer dpo: 1 samples -> 2 rows x 512 tokens per forward; reference: a no-grad forward" in out
    assert main(["plan", small_config, "--trainer", "dpo", "--max_completion_length", "64"]) == 2
    assert "`--max_completion_length` applies to --trainer grpo/rloo only" in capsys.readouterr().err
    assert main(["plan", small_config, "--strategy", "qlora", "--trainer", "dpo", "--device", "cuda",
                 "--memory_budget", "4GiB", "--json"]) == 0
    choice = json.loads(capsys.readouterr().out)["memory_budget"]
    assert choice["per_device_train_batch_size"] * choice["gradient_accumulation_steps"] == 8
    assert main(["plan", small_config, "--trainer", "grpo", "--memory_budget", "4GiB"]) == 2
    assert "cannot size --trainer grpo batches" in capsys.readouterr().err


def test_memory_budget_sizes_dpo_pairs_by_their_rows(setup):
    config, strategy, options, pm = setup
    settings = PlanSettings(batch_size=1, seq_len=1024, device="cuda")
    budget = 1600 * 2**20
    sft = choose(config, "qlora", strategy, options, settings, budget, 8, 8, pm=pm)
    dpo_peaks = peaks_for(TrainerPasses("dpo"))
    dpo = choose(config, "qlora", strategy, options, settings, budget, 8, 8, pm=pm, trainer_peaks=dpo_peaks)
    assert dpo["per_device_train_batch_size"] < sft["per_device_train_batch_size"]
    dpo_plan = plan_trainer(config, "qlora", strategy, options,
                            dataclasses.replace(settings, batch_size=dpo["per_device_train_batch_size"],
                                                eval_batch_size=dpo["per_device_train_batch_size"]),
                            TrainerPasses("dpo"), pm)
    assert abs(dpo["predicted_peak_bytes"] - dpo_plan.total_bytes) < 0.02 * dpo_plan.total_bytes
    with pytest.raises(QLoRAPluginError, match="Nothing fits"):
        choose(config, "qlora", strategy, options, settings, 800 * 2**20, 8, 8, pm=pm, trainer_peaks=dpo_peaks)


def test_memory_budget_refused_only_where_the_plan_cannot_size_the_batch():
    for kind in ("dpo", "kto", "reward"):
        check_kind_options(options_for_kind(StrategyOptions(memory_budget="8GiB"), KINDS[kind], {}), KINDS[kind])
    for kind in ("grpo", "rloo"):
        with pytest.raises(QLoRAPluginError, match="bounds no prompt length"):
            check_kind_options(StrategyOptions(memory_budget="8GiB"), KINDS[kind])
