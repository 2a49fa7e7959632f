"""The registry of quantization backends and the questions every call site asks it: which backend a run's options
chose, which one a quantization config or a loaded model belongs to, and the one check of a quantization asked
for outside the strategy."""

from __future__ import annotations

from qlora_plugin.core.errors import QLoRAPluginError
from qlora_plugin.core.options import FOUR_BIT_OPTIONS
from qlora_plugin.quant.backends import bnb_4bit, bnb_int8
from qlora_plugin.quant.backends.base import NONE, QuantBackend

BUILT_IN = (bnb_4bit.BACKEND, bnb_int8.BACKEND)
_registry: dict[str, QuantBackend] = {backend.name: backend for backend in BUILT_IN}


def register(backend: QuantBackend) -> None:
    """Add a backend (a plugin may call this at import). A name is registered once."""
    if not backend.name or backend.name == NONE:
        raise QLoRAPluginError(f"A quantization backend needs a name other than {NONE!r}; got {backend.name!r}.")
    if backend.name in _registry and type(_registry[backend.name]) is not type(backend):
        raise QLoRAPluginError(f"Quantization backend {backend.name!r} is already registered.")
    _registry[backend.name] = backend


def registered() -> dict[str, QuantBackend]:
    """Every backend by name, the built-in ones first."""
    return dict(_registry)


def backend_named(name: str | None) -> QuantBackend | None:
    """The backend called `name` (`none`/None: a 16-bit base); an unknown name is refused with the known ones."""
    if name in (None, NONE):
        return None
    backends = registered()
    if name not in backends:
        raise QLoRAPluginError(
            f"`quant_backend` must be one of {', '.join([*backends, NONE])}; got {name!r}."
        )
    return backends[name]


def backend_for(options) -> QuantBackend | None:
    """The backend a run's options chose (None: a 16-bit base). `StrategyOptions` keeps `quant_backend` and
    `load_in_4bit` consistent, so this is the one answer every call site uses."""
    return backend_named(options.quant_backend)


def backend_of_config(config) -> QuantBackend | None:
    """The backend that loads a quantization config (a user's `BitsAndBytesConfig`, a checkpoint's dict)."""
    if not config:
        return None
    return next((b for b in registered().values() if b.owns_config(config)), None)


def backend_of_model(model) -> QuantBackend | None:
    """The backend whose layers a loaded (possibly PEFT-wrapped) model holds; None for a 16-bit model."""
    return next((b for b in registered().values() if b.quantized_layers(model)), None)


def describe(backend: QuantBackend | None) -> str:
    """The base in words, for messages: "4-bit base (bnb_4bit)", "16-bit base"."""
    return f"{backend.label} base ({backend.name})" if backend else "16-bit base"


def check_options_apply(options, explicit: dict, strategy: str) -> None:
    """Options that act on 4-bit layers only, set by the user for a run on another quantized base (`lora-int8`),
    would be silently ignored: refused (turning one off, `false`, is harmless and accepted)."""
    backend = backend_for(options)
    if backend is None or backend.name == "bnb_4bit":
        return  # 16-bit runs keep their historical leniency (`qlora-plugin strategies` says what does not apply)
    given = [name for name in FOUR_BIT_OPTIONS if name in explicit and explicit[name] is not False]
    if given:
        raise QLoRAPluginError(
            f"`{given[0]}` acts on 4-bit layers only, and `--strategy {strategy}` trains on {backend.article} "
            f"{backend.label} base ({backend.name}). Remove it, or use `--strategy qlora` for a 4-bit base."
        )


def check_asked_quantization(config, options=None, flag: str | None = None) -> None:
    """The one check of a base quantization asked for outside the strategy, against the run's backend: TRL's
    `--load_in_8bit` flag (`flag`, checked before the strategy is resolved, so any strategy: each picks its base),
    or a user's `quantization_config` (script or `model_init_kwargs`), refused before any weight is read when it
    is another backend's. A config of the run's own backend is the user's to set (theirs wins)."""
    if flag is not None:
        raise QLoRAPluginError(
            f"`--{flag}` contradicts `--strategy`: the strategy picks how its base is quantized (qlora 4-bit, "
            f"lora-int8 8-bit, lora 16-bit). Remove `--{flag}` (use `--strategy lora-int8` for LoRA on an 8-bit "
            "base), or drop `--strategy` to use TRL's own 8-bit loading."
        )
    theirs, ours = backend_of_config(config), backend_for(options)
    if theirs is None or theirs is ours:  # no config, another library's (used, with a warning), or ours
        return
    raise QLoRAPluginError(
        f"A `quantization_config` with {theirs.flag} contradicts the strategy ({describe(ours)}). Remove it (or "
        f"`--{theirs.flag}`), or use `--strategy {theirs.strategy}` for {theirs.article} {theirs.label} base."
    )
