"""Library messages that say nothing a user of the strategy can act on, left out of a run (standard library only).

Each is matched exactly (its logger or warning category, its module and the start of its text); everything else
is shown as the library wrote it. docs/troubleshooting.md ("What a run prints") lists them:

- bitsandbytes, at import on CPUs with AVX512-BF16: "Failed to load CPU gemm_4bit_forward from kernels-community
  ...". Under a strategy `hub_code.py` keeps bitsandbytes from downloading that kernel from the Hub; bitsandbytes
  then uses its own wheel's CPU kernels, and the note says nothing the user can act on.
- accelerate, in `trl sft`: "The following values were not passed to `accelerate launch` ..." when every value
  it lists is the single-machine default (one process, or `0` on a machine without a GPU, which runs one).
  The note that more than one GPU was found, and any other count, are kept.
- transformers: "`gradient_checkpointing` is deprecated", which TRL's own `SFTConfig` default raises for a flag
  the user never typed (the strategy sets `activation_checkpointing`); a user who names the flag still sees it.
- transformers, through peft: "`is_gradient_checkpointing` is deprecated", raised inside peft's
  `get_peft_model` when the strategy adds LoRA (and when `plan` builds its skeleton).
- huggingface_hub, when the Hub cannot be reached: a pair of lines per retry (about 20 s of them) becomes one
  line that says what is happening and that `HF_HUB_OFFLINE=1` fails at once (in strategy runs and in the
  `qlora-plugin` commands, e.g. `plan` on a Hub id).
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings

BNB_CPU_KERNEL = ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community")
ACCELERATE_DEFAULTS = ("accelerate.commands.launch",
                       "The following values were not passed to `accelerate launch` and had defaults used instead")
HUB_HTTP = "huggingface_hub.utils._http"
TRL_CHECKPOINTING_DEFAULT = r"`gradient_checkpointing` is deprecated"
PEFT_CHECKPOINTING_PROPERTY = r"`is_gradient_checkpointing` is deprecated"

_REQUEST_FAILED = re.compile(r"'(?P<error>.*)' thrown while requesting \S+ (?P<url>\S+)$", re.DOTALL)
_RETRYING = re.compile(r"Retrying in \S+ \[Retry \d+/\d+\]\.$")


class _Drop(logging.Filter):
    """Leaves out the records of one logger that `matches` says mean nothing to the user."""

    def __init__(self, matches):
        super().__init__()
        self.matches = matches

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.matches(record)


def _bnb_cpu_kernel(record) -> bool:
    return record.getMessage().startswith(BNB_CPU_KERNEL[1])


def _single_machine_defaults(record) -> bool:
    text = record.getMessage()
    if not text.startswith(ACCELERATE_DEFAULTS[1]) or "More than one GPU" in text:
        return False
    processes = re.search(r"`--num_processes` was set to a value of `(\d+)`", text)
    return processes is None or int(processes.group(1)) <= 1


class _HubRetries(logging.Filter):
    """huggingface_hub's retries after a failed connection: the first failure becomes one line saying what is
    happening, the further failures and "Retrying in ..." lines are left out. HTTP errors are kept as they are."""

    def __init__(self):
        super().__init__()
        self.retrying = False
        self.said = set()

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        failed = _REQUEST_FAILED.match(text)
        if failed:
            self.retrying = True
            host = "/".join(failed["url"].split("/")[:3])
            if host in self.said:
                return False
            self.said.add(host)
            record.msg, record.args = (
                f"[qlora-plugin] {host} cannot be reached ({failed['error']}); huggingface_hub retries for about "
                "20 s before it gives up. HF_HUB_OFFLINE=1 uses local files only and fails at once.", ())
            return True
        if _RETRYING.match(text):
            return not self.retrying
        self.retrying = False  # an HTTP error: its retries are shown
        return True


def _add_once(logger_name: str, log_filter: logging.Filter) -> None:
    def key(f):
        return type(f), getattr(f, "matches", None)

    logger = logging.getLogger(logger_name)
    if all(key(f) != key(log_filter) for f in logger.filters):
        logger.addFilter(log_filter)


def leave_out_bnb_cpu_kernel_note() -> None:
    """For `qlora-plugin` commands and strategy runs: bitsandbytes' note about its CPU repacking kernel."""
    _add_once(BNB_CPU_KERNEL[0], _Drop(_bnb_cpu_kernel))


def leave_out_for_a_command() -> None:
    """For `qlora-plugin` commands: the bitsandbytes note, and huggingface_hub's retries as one line (`plan` and
    `merge` may ask the Hub for a config)."""
    leave_out_bnb_cpu_kernel_note()
    _add_once(HUB_HTTP, _HubRetries())


def leave_out_for_a_strategy_run(user_named_gradient_checkpointing: bool) -> None:
    """Called when a strategy activates in a script (its libraries are not imported yet)."""
    leave_out_bnb_cpu_kernel_note()
    _add_once(ACCELERATE_DEFAULTS[0], _Drop(_single_machine_defaults))
    _add_once(HUB_HTTP, _HubRetries())
    if not user_named_gradient_checkpointing:
        warnings.filterwarnings("ignore", message=TRL_CHECKPOINTING_DEFAULT, category=FutureWarning,
                                module=r"transformers\.training_args")


@contextlib.contextmanager
def library_deprecations():
    """Around the plugin's own calls into peft and TRL: the two deprecation warnings above that they raise for
    names the plugin does not use (peft's `is_gradient_checkpointing`, TRL's `gradient_checkpointing` default)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=PEFT_CHECKPOINTING_PROPERTY, category=FutureWarning)
        warnings.filterwarnings("ignore", message=TRL_CHECKPOINTING_DEFAULT, category=FutureWarning,
                                module=r"transformers\.training_args")
        yield
