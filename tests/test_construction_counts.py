"""What one run builds: one plugin manager and one set of options per request, and for `--memory_budget` one
meta-device skeleton per config the plan needs (the model, and its 1- and 2-layer cuts), shared by the budget
choice and the run's prediction."""

from __future__ import annotations

import pluggy
from datasets import load_dataset

from conftest import DATA
from qlora_plugin.integration import activation
from qlora_plugin.core.options import StrategyOptions
from qlora_plugin.plan import skeleton


def _count(monkeypatch):
    counts = {"managers": 0, "options": 0, "skeletons": 0}

    class CountedManager(pluggy.PluginManager):
        def __init__(self, *args, **kwargs):
            counts["managers"] += 1
            super().__init__(*args, **kwargs)

    post_init, build = StrategyOptions.__post_init__, skeleton._build

    def counted_post_init(self):
        counts["options"] += 1
        post_init(self)

    def counted_build(*args, **kwargs):
        counts["skeletons"] += 1
        return build(*args, **kwargs)

    monkeypatch.setattr(pluggy, "PluginManager", CountedManager)
    monkeypatch.setattr(StrategyOptions, "__post_init__", counted_post_init)
    monkeypatch.setattr(skeleton, "_build", counted_build)
    return counts


def test_a_budget_run_builds_one_manager_one_options_and_one_skeleton_per_config(tiny_models, tmp_path, monkeypatch):
    """The script path in-process: activation's check, then the trainer's pipeline (budget choice and prediction)."""
    from trl import SFTConfig, SFTTrainer

    counts = _count(monkeypatch)
    request, _ = activation.request_from_process(["--strategy", "qlora", "--memory_budget", "8GiB"], {})
    activation.validate(request)
    activation.activate(request)
    trainer = SFTTrainer(model=tiny_models["llama"], train_dataset=load_dataset(str(DATA))["train"],
                         args=SFTConfig(output_dir=str(tmp_path), max_steps=1, report_to="none", use_cpu=True,
                                        save_strategy="no", max_length=32))
    facts = next(cb.facts for cb in trainer.callback_handler.callbacks if hasattr(cb, "facts"))
    assert facts["memory_budget"]["per_device_train_batch_size"] >= 1 and facts["memory"]["predicted_peak_bytes"]
    layers = trainer.model.config.num_hidden_layers  # the plan's configs: the model's, and its 1- and 2-layer cuts
    assert counts == {"managers": 1, "options": 1, "skeletons": len({layers, 1, 2})}, counts  # 1, 1, 9 before
    assert skeleton._kept.get(request.resolved.pm) is None  # dropped once the run's planning is done


def test_a_new_request_resolves_afresh(monkeypatch):
    from qlora_plugin.plugin.resolution import forget, resolve

    counts = _count(monkeypatch)
    request, _ = activation.request_from_process(["--strategy", "qlora"], {})
    first = resolve(request)
    assert resolve(request) is first and counts["managers"] == 1
    forget(request)
    assert resolve(request) is not first and counts["managers"] == 2
    other, _ = activation.request_from_process(["--strategy", "lora"], {})
    assert resolve(other).strategy.name == "lora" and counts["managers"] == 3


def test_shared_skeletons_give_the_same_plan(tiny_models, monkeypatch):
    """Reusing a skeleton across the batch-1, batch-2 and run plans changes no figure."""
    from qlora_plugin.plan.estimate import PlanSettings, load_config, plan_strategy
    from qlora_plugin.plugin.manager import get_plugin_manager
    from qlora_plugin.strategies.builtin import QLORA

    config = load_config(tiny_models["llama"])
    options = StrategyOptions()
    shared = get_plugin_manager(load_entrypoints=False)
    settings = [PlanSettings(batch_size=b, seq_len=64) for b in (1, 2, 1)]
    counts = _count(monkeypatch)
    reused = []
    for s in settings:
        reused.append(plan_strategy(config, "qlora", QLORA, options, s, shared).components)
        built = built if reused[1:] else counts["skeletons"]
    assert counts["skeletons"] == built  # the batch-2 and repeated plans built none
    fresh = [plan_strategy(config, "qlora", QLORA, options, s, get_plugin_manager(load_entrypoints=False)).components
             for s in settings]
    assert reused == fresh
    skeleton.drop_skeletons(shared)
    assert shared not in skeleton._kept


def test_listing_strategies_and_options_loads_no_training_stack():
    """`qlora-plugin strategies` and `options` register only the catalog plugins and read the packaged hooks'
    docstrings from their source: no torch, transformers, TRL, peft or bitsandbytes is imported (it took 11 s)."""
    import subprocess
    import sys

    code = ("import sys; from qlora_plugin.cli import main; main(['strategies']); main(['options']); "
            "print('LOADED', [m for m in ('torch', 'transformers', 'trl', 'peft', 'bitsandbytes') if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "qlora  [qlora_plugin.strategies.presets]" in proc.stdout and "| `cpu_fast_dropout`" in proc.stdout
    assert "LOADED []" in proc.stdout, proc.stdout[-300:]
