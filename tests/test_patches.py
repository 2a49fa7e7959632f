"""What the plugin patches: the strategy's trainer gets its wrappers as instance attributes, every other trainer in
the process is TRL's own, byte for byte (docs/architecture.md, "What we patch and why")."""

from __future__ import annotations

import pytest
from datasets import load_dataset

from conftest import DATA

WRAPPED = ("train", "_save_checkpoint", "save_model")


def _config(out):
    from trl import SFTConfig

    return SFTConfig(output_dir=str(out), max_steps=1, per_device_train_batch_size=2, report_to="none", use_cpu=True,
                     save_strategy="no", max_length=32)


def _own_methods():
    """The functions TRL's and transformers' classes hold for the wrapped names (what a plain trainer runs)."""
    from transformers import Trainer
    from trl import SFTTrainer

    return {name: (vars(Trainer).get(name), vars(SFTTrainer).get(name)) for name in WRAPPED}


@pytest.fixture
def unpatched_trainer(monkeypatch):
    """transformers' own methods on `Trainer`, whatever an earlier test's `apply_strategy` fallback installed."""
    from transformers import Trainer

    for name in WRAPPED:
        function = vars(Trainer)[name]
        monkeypatch.setattr(Trainer, name, getattr(function, "__wrapped__", function))


def test_only_the_strategy_trainer_is_wrapped(tiny_models, tmp_path, unpatched_trainer):
    from trl import SFTTrainer

    from qlora_plugin import make_trainer

    dataset = load_dataset(str(DATA))["train"]
    before = _own_methods()
    plain_before = SFTTrainer(model=tiny_models["llama"], args=_config(tmp_path / "a"), train_dataset=dataset)
    ours = make_trainer("qlora", model=tiny_models["llama"], args=_config(tmp_path / "b"), train_dataset=dataset)
    plain_after = SFTTrainer(model=tiny_models["llama"], args=_config(tmp_path / "c"), train_dataset=dataset)

    for name in WRAPPED:  # the strategy's trainer: its own bound wrappers, over its class's methods
        method = vars(ours)[name]
        assert method.__self__ is ours and method.__func__._qlora_plugin
        assert method.__func__.__wrapped__ is getattr(SFTTrainer, name)
    assert _own_methods() == before  # the classes are untouched ...
    assert not any(getattr(f, "_qlora_plugin", False) for pair in before.values() for f in pair if f)
    for name in WRAPPED:
        assert getattr(type(plain_after), name) is getattr(SFTTrainer, name)
        assert name not in vars(plain_after)
    assert set(vars(plain_after)) == set(vars(plain_before))  # ... and a plain trainer gets no attribute of ours


def test_apply_strategy_falls_back_to_class_wrappers_that_pass_through(monkeypatch, unpatched_trainer):
    """`SFTTrainer(**apply_strategy(...))`: the plugin never sees that trainer, so the wrappers go on the class;
    they hand a trainer without the strategy straight to transformers' own method."""
    from transformers import Trainer

    from qlora_plugin.training import checkpointing

    original_save = vars(Trainer)["save_model"]
    checkpointing.patch_trainer_class()
    wrapped = vars(Trainer)["save_model"]
    assert wrapped._qlora_plugin and wrapped.__wrapped__ is original_save
    checkpointing.patch_trainer_class()
    assert vars(Trainer)["save_model"] is wrapped  # once

    calls = []

    class Plain:  # no StrategyReportCallback: not a strategy trainer
        callback_handler = type("H", (), {"callbacks": []})()
        args = None

    fake = checkpointing._make_save_model(lambda self, out, internal: calls.append((out, internal)))
    fake(Plain(), "out", False)
    assert calls == [("out", False)]

    trainer = Plain()
    checkpointing.install(trainer)  # the class wrappers act for it already: no second layer
    assert not any(name in vars(trainer) for name in WRAPPED)

