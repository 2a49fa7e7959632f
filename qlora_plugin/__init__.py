"""qlora-plugin: QLoRA as a one-word strategy for TRL's SFTTrainer (`--strategy qlora`).

Importing this package is cheap: no torch, transformers or TRL until you use something that needs them.
"""

__version__ = "0.1.0"

_LAZY = {
    "apply_strategy": ".api",
    "make_trainer": ".api",
    "get_plugin_manager": ".plugins",
    "make_cpu_inference_safe": ".cpu_compat",
    "hookimpl": ".hookspecs",
    "Strategy": ".strategy",
    "StrategyOptions": ".options",
    "QLoRAPluginError": ".errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'qlora_plugin' has no attribute {name!r}")
