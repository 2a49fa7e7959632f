"""Optimizer creation: bitsandbytes' paged AdamW (the paper's `paged_adamw_32bit`, or `paged_adamw_8bit`).

Paged optimizers keep their state in CUDA unified memory so a memory spike pages it to the CPU instead of
crashing. On a CPU there is nothing to page: bitsandbytes runs them non-paged, and the run summary says so once.
"""

from __future__ import annotations

import warnings

from qlora_plugin.quant.config import require_bitsandbytes
from qlora_plugin.strategies.paged_state import resumable

BNB_OPTIMIZERS = {
    "paged_adamw_32bit": "PagedAdamW32bit",
    "paged_adamw_8bit": "PagedAdamW8bit",
    "paged_adamw": "PagedAdamW",
    "adamw_8bit": "AdamW8bit",
    "adamw_bnb_8bit": "AdamW8bit",
}
CPU_PAGING_NOTE = "paged optimizer runs non-paged on CPU (bitsandbytes pages GPU memory only)"


def optim_name(training_args) -> str:
    optim = training_args.optim
    return str(getattr(optim, "value", optim))


def bitsandbytes_optimizer(training_args):
    """`(class, kwargs)` for a bitsandbytes optimizer named by `training_args.optim`; None for any other name."""
    class_name = BNB_OPTIMIZERS.get(optim_name(training_args))
    if class_name is None:
        return None
    require_bitsandbytes()
    import bitsandbytes.optim

    # bitsandbytes warns on every parameter group; the run summary states the fallback once instead.
    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
    kwargs = {
        "lr": training_args.learning_rate,
        "betas": (training_args.adam_beta1, training_args.adam_beta2),
        "eps": training_args.adam_epsilon,
    }
    return resumable(getattr(bitsandbytes.optim, class_name)), kwargs  # paged state survives resume
