"""`qlora-plugin`: the plugin's own command line (`strategies`, `tiny-model`)."""

from __future__ import annotations

import argparse
import dataclasses
import sys

sys._qlora_plugin_own_cli = True  # our own flags (e.g. --strategy) are never taken as an activation


def _strategies(args) -> int:
    from .options import StrategyOptions
    from .plugins import collect_strategies, get_plugin_manager, hook_files_from_env

    pm = get_plugin_manager([*hook_files_from_env(), *(args.hooks or [])])
    defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
                for f in dataclasses.fields(StrategyOptions)}
    for strategy in sorted(collect_strategies(pm).values(), key=lambda s: s.name):
        print(f"{strategy.name}  [{strategy.plugin}]")
        print(f"    {strategy.description}")
        for name, default in defaults.items():
            value = strategy.option_defaults.get(name, default)
            print(f"    --{name} (default: {value})")
        print()
    return 0


def _options(args) -> int:
    from .options import options_reference_markdown

    print(options_reference_markdown(), end="")
    return 0


def _tiny_model(args) -> int:
    from .tiny_model import build_tiny_model

    path = build_tiny_model(args.out, args.arch, args.data, args.hidden_size, args.layers, args.intermediate_size)
    print(f"tiny {args.arch} model and tokenizer written to {path}")
    return 0


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlora-plugin", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("strategies", help="List installed strategies and their options.")
    p.add_argument("--hooks", nargs="*", help="Hook files to load as well.")
    p.set_defaults(func=_strategies)
    p = sub.add_parser("options", help="Print the strategy options reference (Markdown).")
    p.set_defaults(func=_options)
    p = sub.add_parser("tiny-model", help="Build a small random model + tokenizer offline (demos, tests).")
    p.add_argument("out")
    p.add_argument("--arch", default="llama", choices=["llama", "gpt2", "phi3"])
    p.add_argument("--data", nargs="*", default=[], help="JSONL files to train the tokenizer on.")
    p.add_argument("--hidden-size", type=_positive_int, default=128)
    p.add_argument("--layers", type=_positive_int, default=2)
    p.add_argument("--intermediate-size", type=_positive_int, default=None)
    p.set_defaults(func=_tiny_model)
    return parser


def main(argv=None) -> int:
    from .errors import QLoRAPluginError

    args = make_parser().parse_args(argv)
    try:
        return args.func(args)
    except QLoRAPluginError as err:
        print(f"qlora-plugin: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
