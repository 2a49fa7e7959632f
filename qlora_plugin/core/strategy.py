"""A strategy is a named preset of `StrategyOptions` that plugins register and hooks recognise by name."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from qlora_plugin.core.errors import QLoRAPluginError
from qlora_plugin.core.options import OPTION_NAMES


@dataclass(frozen=True)
class Strategy:
    """`--strategy NAME`. `option_defaults` override `StrategyOptions` defaults; the user's choices override both.

    `plugin` is filled in with the name of the plugin that registered it.
    """

    name: str
    description: str
    option_defaults: Mapping = field(default_factory=dict)
    plugin: str = ""

    def __post_init__(self):
        if not self.name or not self.name.replace("-", "_").isidentifier():
            raise QLoRAPluginError(f"Strategy name {self.name!r} must be a word (letters, digits, - or _).")
        unknown = sorted(set(self.option_defaults) - set(OPTION_NAMES))
        if unknown:
            raise QLoRAPluginError(f"Strategy {self.name!r} sets unknown option(s): {', '.join(unknown)}.")
        object.__setattr__(self, "option_defaults", MappingProxyType(dict(self.option_defaults)))

    @property
    def quantized(self) -> bool:
        return bool(self.option_defaults.get("load_in_4bit", True))


def _folded(name: str) -> str:
    return name.casefold().replace("-", "_")


def resolve_name(name: str, available) -> str:
    """The registered spelling of `name`: strategy names match regardless of case and of `-` for `_` (`QLoRA`,
    the paper's spelling, is `qlora`). A name that matches none, or several, is returned as given."""
    if name in available:
        return name
    same = [known for known in available if _folded(known) == _folded(name)]
    return same[0] if len(same) == 1 else name


BASE_WORDS = {"bnb_4bit": "4-bit", "bnb_int8": "8-bit", "none": "16-bit"}  # the built-in `quant_backend`s


def _family(strategy) -> str:
    if not isinstance(strategy, Strategy):
        return ""
    backend = strategy.option_defaults.get("quant_backend") or ("bnb_4bit" if strategy.quantized else "none")
    return f" ({BASE_WORDS.get(backend, backend)} base)"


def unknown_strategy_error(name: str, available) -> QLoRAPluginError:
    """The error for `--strategy NAME` that no installed plugin registers: lists them and the closest ones.

    `available` is a mapping of name to `Strategy` (or just the names). Every close name is offered with what it
    trains on -- a 4-bit, 8-bit or 16-bit base -- so a typo is never steered silently from one family to the other
    (`qloar` is as close to `lora` as to `qlora`)."""
    strategies = available if isinstance(available, Mapping) else dict.fromkeys(available)
    folded = {_folded(known): known for known in strategies}
    close = [folded[f] for f in difflib.get_close_matches(_folded(name), list(folded), n=3)]
    offers = [f"{known!r}{_family(strategies[known])}" for known in close]
    hint = f" Did you mean {' or '.join(offers)}?" if offers else ""
    return QLoRAPluginError(
        f"Unknown strategy {name!r}.{hint} Available: {', '.join(sorted(strategies))}. "
        "`qlora-plugin strategies` lists them with their options; plugins add more."
    )
