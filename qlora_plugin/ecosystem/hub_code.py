"""No code from the Hub under a strategy: bitsandbytes is imported without the `kernels` package (standard library
only, so it can be installed before any machine-learning library loads).

Why: bitsandbytes (0.49+) on CPUs with AVX512-BF16 calls `kernels.get_kernel("kernels-community/
quantization-bitsandbytes")` when it is imported, which downloads a compiled kernel from the Hub and loads it
into the process. transformers 5.25 made `kernels` a dependency, so every fresh install does it. This project
promises never to run code the user did not install or name (docs/troubleshooting.md, "Security"), so while
`bitsandbytes` is first imported in a strategy run or a `qlora-plugin` command, `kernels` reads as not
installed. bitsandbytes then falls back to the CPU kernels its own wheel ships (same results; the fused kernel
only speeds up inference-time CPU matrix-vector products) and logs one note, which `notices.py` leaves out.
Everything else keeps `kernels` (transformers' opt-in `use_kernels=True` is the user's own choice).
"""

from __future__ import annotations

import sys

GUARDED = "bitsandbytes"
HUB_CODE_PACKAGE = "kernels"
_MISSING = object()


class _WithoutHubCode:
    """A loader proxy: executes bitsandbytes' top module with `kernels` unimportable, then restores it."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        saved = sys.modules.get(HUB_CODE_PACKAGE, _MISSING)
        sys.modules[HUB_CODE_PACKAGE] = None  # `from kernels import ...` raises ImportError, nothing is fetched
        try:
            self._loader.exec_module(module)
        finally:
            if saved is _MISSING:
                sys.modules.pop(HUB_CODE_PACKAGE, None)
            else:
                sys.modules[HUB_CODE_PACKAGE] = saved

    def __getattr__(self, name):
        return getattr(self._loader, name)


def spec_from_the_other_finders(owner, fullname, path=None, target=None):
    """The module spec the rest of `sys.meta_path` finds for `fullname` (what a finder that wraps a loader, such
    as this module's and `integration.import_hook`'s, starts from), or None."""
    for finder in sys.meta_path:
        if finder is owner or not hasattr(finder, "find_spec"):
            continue
        spec = finder.find_spec(fullname, path, target)
        if spec is not None and spec.loader is not None:
            return spec
    return None


class BitsandbytesWithoutHubCode:
    """A `sys.meta_path` finder for the first import of `bitsandbytes` only."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != GUARDED:
            return None
        spec = spec_from_the_other_finders(self, fullname, path, target)
        if spec is not None:
            spec.loader = _WithoutHubCode(spec.loader)
        return spec


_state = {"late": False}


def refuse_hub_kernels() -> None:
    """Installs the guard (once), before `bitsandbytes` is first imported. Called too late (the user imported
    bitsandbytes first), it remembers that for `status()`."""
    if GUARDED in sys.modules:
        _state["late"] = not any(isinstance(f, BitsandbytesWithoutHubCode) for f in sys.meta_path)
    elif not any(isinstance(f, BitsandbytesWithoutHubCode) for f in sys.meta_path):
        sys.meta_path.insert(0, BitsandbytesWithoutHubCode())


def status() -> str | None:
    """For the run summary: None when no Hub code can have been loaded (the guard came first, or `kernels` is not
    installed), else a line that says what happened and what to do."""
    if not _state["late"] or sys.modules.get(HUB_CODE_PACKAGE) is None:
        return None
    return ("bitsandbytes was imported before the strategy was applied and may have loaded a CPU kernel from the "
            "Hub (`kernels` is installed): import qlora_plugin's API before bitsandbytes to keep Hub code out")
