"""qlora-plugin: QLoRA as a one-word strategy for TRL's SFTTrainer (`--strategy qlora`).

Importing this package is cheap: no torch, transformers or TRL until you use something that needs them.
"""

__version__ = "0.1.0"

_LAZY = {
    "apply_strategy": ".integration.api",
    "make_trainer": ".integration.api",
    "get_plugin_manager": ".plugin.manager",
    "make_cpu_inference_safe": ".quant.cpu_guard",
    "hookimpl": ".plugin.specs",
    "Strategy": ".core.strategy",
    "StrategyOptions": ".core.options",
    "QLoRAPluginError": ".core.errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'qlora_plugin' has no attribute {name!r}")
