"""The quantization backend interface: how the frozen base is stored, one file per backend (`bnb_4bit.py`,
`bnb_int8.py`), chosen through `registry.py`.

The one place to start when adding a backend (docs/architecture.md, "Adding a quantization backend"): subclass
`QuantBackend` in a new file beside `bnb_4bit.py` and `bnb_int8.py`, answer its questions, and add it to
`registry.BUILT_IN` (a plugin calls `registry.register`). Everything else in the plugin asks the backend the run
chose (`backend_for(options)`), or the one a loaded model or a saved record names (`backend_of_model`,
`backend_named`), never a library class directly:

- loading: `quantization_config` (the `from_pretrained` kwargs), `owns_config` (is a user's config ours?);
- which layers: `quantized_module_names` (transformers' rule, on a meta-device skeleton), `quantized_layers`;
- the summary, report and record: `facts`, `record`;
- `plan`: `weight_bytes` per quantized weight;
- the quantized-base cache and LoftQ starts: `cacheable`, `loftq`;
- `merge`: `roundtrip` (dequant(quant(W)) from the original weights, as training held them), `dequantize`
  (a loaded layer's weight), `reference_config` (the base the fidelity check rebuilds).
"""

from __future__ import annotations

from qlora_plugin.core.errors import QLoRAPluginError

NONE = "none"  # `quant_backend none`: a 16-bit base


class QuantBackend:
    """One way of storing the frozen base. Class attributes say what it is; methods answer for a model."""

    name = ""  # `--quant_backend NAME`, and what the record beside an adapter says
    label = ""  # the base in words: "4-bit", "8-bit"
    article = "a"  # before the label: "a 4-bit", "an 8-bit"
    flag = ""  # the `BitsAndBytesConfig` / TRL `ModelConfig` switch that asks for it: load_in_4bit
    strategy = ""  # the built-in strategy that trains on this base (named in errors)
    library = "bitsandbytes"
    cacheable = False  # `quantized_cache` can store this base (quant/cache.py)
    loftq = False  # LoftQ / calibrated LoftQ starts apply (they correct this backend's quantization error)

    def require(self) -> None:
        """The library imports and has a backend for this machine; otherwise say how to fix it."""
        try:
            __import__(self.library)
        except Exception as err:  # ImportError, or a broken native library
            raise QLoRAPluginError(
                f"{self.article.capitalize()} {self.label} base needs {self.library}, which could not be imported "
                f"({type(err).__name__}: {err}). Install it with `pip install '{self.library}>=0.50'` (CPU and CUDA "
                "wheels on PyPI), or use `--strategy lora` for 16-bit LoRA without it."
            ) from None

    def quantization_config(self, options, runtime, load_dtype):
        """The `quantization_config` `from_pretrained` gets for this base."""
        raise NotImplementedError

    def owns_config(self, config) -> bool:
        """Is `config` (a transformers quantization config, or its dict) one this backend loads?"""
        raise NotImplementedError

    def quantized_module_names(self, model, skip_modules=None) -> list[str]:
        """Names of the layers a real load quantizes (works on a meta-device skeleton)."""
        from qlora_plugin.quant.layers import four_bit_module_names  # transformers' bitsandbytes rule, both widths

        return four_bit_module_names(model, skip_modules)

    def quantized_layers(self, model) -> list:
        """The quantized layers of a loaded model (not peft's wrappers around them)."""
        raise NotImplementedError

    def facts(self, model) -> dict:
        """The base as the run summary and the training report describe it."""
        raise NotImplementedError

    def summary_line(self, facts: dict) -> str:
        """The run summary's line for this base, from `facts(model)` (docs/reading-the-summary.md shows it)."""
        raise NotImplementedError

    def record(self, model) -> dict:
        """What `merge` needs to rebuild this base, saved beside every adapter (quant/record.py)."""
        raise NotImplementedError

    def weight_bytes(self, numel: int, rows: int, options) -> dict:
        """`plan`: bytes one quantized weight of `numel` elements (`rows` output rows) holds: `packed` (the codes)
        and `constants` (scales and code maps)."""
        raise NotImplementedError

    def roundtrip(self, weight, settings: dict, device=None):
        """`merge`: dequant(quant(W)) for an original (out, in) weight, as training held it (float32); on `device`
        when given (the fidelity check's), else on the CPU."""
        raise NotImplementedError

    def dequantize(self, layer):
        """A loaded quantized layer's weight, dequantized (float32, (out, in))."""
        raise NotImplementedError

    def reference_config(self, settings: dict):
        """`merge`'s fidelity check: the `quantization_config` that reloads the base as training held it."""
        raise NotImplementedError


def bitsandbytes_setting(config, key: str):
    """`key` of a bitsandbytes quantization config (a `BitsAndBytesConfig` or its dict); None for another
    method's config."""
    get = config.get if isinstance(config, dict) else (lambda name, default=None: getattr(config, name, default))
    method = get("quant_method", "bitsandbytes")
    if str(getattr(method, "value", method)) != "bitsandbytes":
        return None
    return get(key)
