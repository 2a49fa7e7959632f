"""The plugin's own command-line flags (`--strategy`, `--qlora_hooks`, every strategy option), parsed the way TRL
parses its own (transformers' `HfArgumentParser` over the option dataclass), for activation and `plan` alike."""

from __future__ import annotations

import argparse
import dataclasses

from qlora_plugin.core.options import StrategyOptions, options_class


@dataclasses.dataclass
class _ActivationFlags:
    strategy: str | None = dataclasses.field(default=None, metadata={"help": "QLoRA-plugin strategy name."})
    qlora_hooks: list[str] | None = dataclasses.field(default=None, metadata={"help": "Hook files to load."})
    use_peft: bool = False
    load_in_8bit: bool = False


def _flag_parser(options=StrategyOptions) -> argparse.ArgumentParser:
    from transformers import HfArgumentParser

    parser = HfArgumentParser((_ActivationFlags, options), prog="qlora-plugin", add_help=False)
    parser.allow_abbrev = False
    parser.usage = "--strategy NAME [strategy options] (`qlora-plugin strategies` lists them)"
    for action in parser._actions:
        action.default = argparse.SUPPRESS  # the namespace then holds only what was given
        action.required = False
    return parser


def parse_own_flags(argv: list[str], plugin_options: tuple = ()) -> tuple[dict, list[str]]:
    """Split argv into the plugin's flags (only those given; with `plugin_options`, those of the plugins too) and
    everything else, in order."""
    parser = _flag_parser(options_class(plugin_options))
    namespace, rest = parser.parse_known_args(argv)
    return vars(namespace), rest


def given_flag_names(argv: list[str]) -> set[str]:
    """Names of `--name value` / `--name=value` flags on a command line (what the user set explicitly)."""
    names = set()
    for token in argv:
        if token.startswith("--") and len(token) > 2:
            name = token[2:].split("=", 1)[0].replace("-", "_")
            names.add(name[3:] if name.startswith("no_") else name)
    return names


TRUE_WORDS = ("yes", "true", "t", "y", "1")
FALSE_WORDS = ("no", "false", "f", "n", "0")


def parse_bool(text) -> bool:
    """A boolean flag's value, with the words TRL's own flags accept (transformers' `string_to_bool`, which a test
    compares this with). Standard library only: activation reads `--use_cpu` before any library is imported."""
    if isinstance(text, bool):
        return text
    word = str(text).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(
        f"Truthy value expected: got {text} but expected one of yes/no, true/false, t/f, y/n, 1/0 (case insensitive)."
    )
