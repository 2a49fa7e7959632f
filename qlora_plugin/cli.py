"""`qlora-plugin`: the plugin's own command line (`strategies`, `options`, `doctor`, `tiny-model`, `plan`, `merge`,
`run`)."""

from __future__ import annotations

import argparse
import difflib
import os
import sys

sys._qlora_plugin_own_cli = True  # our own flags (e.g. --strategy) are never taken as an activation

from qlora_plugin.core.errors import QLoRAPluginError  # noqa: E402 (after the flag above, which must come first)
from qlora_plugin.core.flags import parse_bool  # noqa: E402
from qlora_plugin.ecosystem.hub_code import refuse_hub_kernels  # noqa: E402
from qlora_plugin.ecosystem.notices import leave_out_for_a_command  # noqa: E402
from qlora_plugin.core.options import FOUR_BIT_OPTIONS, option_defaults, options_reference_markdown  # noqa: E402
from qlora_plugin.core.strategy import BASE_WORDS  # noqa: E402
from qlora_plugin.plugin.manager import (  # noqa: E402
    collect_options, collect_strategies, get_plugin_manager, hook_files_from_env, packaged_hooks,
)


def _strategies(args) -> int:
    pm = get_plugin_manager([*hook_files_from_env(), *(args.hooks or [])], catalog_only=True)  # no training stack
    defaults = option_defaults(collect_options(pm))  # the built-in options, then the plugins'
    for strategy in sorted(collect_strategies(pm).values(), key=lambda s: s.name):
        print(f"{strategy.name}  [{strategy.plugin}]")
        print(f"    {strategy.description}")
        not_4bit = strategy.option_defaults.get("load_in_4bit", defaults["load_in_4bit"]) is False
        base = BASE_WORDS.get(strategy.option_defaults.get("quant_backend") or "none", "quantized")
        for name, default in defaults.items():
            if not (not_4bit and name in FOUR_BIT_OPTIONS):
                print(f"    --{name} (default: {strategy.option_defaults.get(name, default)})")
        if not_4bit:
            print(f"    ({'an' if base.startswith('8') else 'a'} {base} base: the 4-bit options {', '.join(FOUR_BIT_OPTIONS)} do not apply)")
        print()
    print("packaged hooks (load with --qlora_hooks NAME, the YAML key qlora_hooks, or QLORA_PLUGIN_HOOKS=NAME):")
    for name, summary in packaged_hooks().items():
        print(f"  {name}: {summary}")
    return 0


def _options(args) -> int:
    pm = get_plugin_manager(hook_files_from_env(), catalog_only=True)  # no training stack
    print(options_reference_markdown(collect_options(pm)), end="")
    return 0


def _doctor(args) -> int:
    """The installed releases against the supported range (compat), then the internals the patches use: 0 when
    a strategy run would start, 1 when activation would refuse it (the line it would print)."""
    from qlora_plugin.ecosystem import compat  # each command loads only its own stack

    rows = compat.version_report()
    print(f"{'library':<14}{'installed':<16}{'supported':<12}")
    for name, found, spec, ok in rows:
        print(f"{name:<14}{found or 'not installed':<16}{spec:<12}{'ok' if ok else 'UNSUPPORTED'}")
    problems = [compat.unsupported_line(name, found, spec) for name, found, spec, ok in rows if not ok]
    if not problems:
        try:
            compat.check_internals()
        except QLoRAPluginError as err:
            problems.append(str(err))
    for line in problems:
        print(f"qlora-plugin: {line}")
    print("a strategy run would refuse to start" if problems else
          "every library is in the supported range and has the internals the plugin uses")
    return 1 if problems else 0


def _tiny_model(args) -> int:
    from qlora_plugin.models.tiny_model import build_tiny_model  # each command loads only its own stack

    path = build_tiny_model(args.out, args.arch, args.data, args.hidden_size, args.layers, args.intermediate_size)
    print(f"tiny {args.arch} model and tokenizer written to {path} (the tokenizer has a chat template: `messages` "
          "data trains too)")
    return 0


def _merge(args) -> int:
    from qlora_plugin.merge.merging import merge, summary_line  # each command loads only its own stack

    summary = merge(args.adapter, args.out, args.base, args.dtype, args.force, args.bnb_4bit_quant_type,
                    args.use_bnb_nested_quant, args.max_shard_size, not args.no_check, args.eval_data, args.trained_on)
    print(summary_line(summary))
    if summary["fidelity"] is not None:
        from qlora_plugin.merge.fidelity import REPORT_FILE, format_table

        print(format_table(summary["fidelity"]))
        print(f"fidelity report: {summary['out']}/{REPORT_FILE}")
    return 0


def _run(args) -> int:
    from qlora_plugin.cpu.malloc_tunables import launch  # each command loads only its own stack

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise QLoRAPluginError("`qlora-plugin run` needs a command, e.g. `qlora-plugin run -- python train.py "
                               "--strategy qlora ...`.")
    try:
        launch(command)
    except OSError as err:
        raise QLoRAPluginError(f"`qlora-plugin run` could not start {command[0]!r}: {err.strerror or err}.") from None
    return 0  # not reached: `launch` replaced this process with the command


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
    p = sub.add_parser("doctor", help="Print the installed torch, transformers, TRL, peft, accelerate, bitsandbytes "
                       "and datasets releases and whether each is supported.")
    p.set_defaults(func=_doctor)
    p = sub.add_parser("tiny-model", help="Build a small random model + tokenizer offline (demos, tests).")
    p.add_argument("out")
    p.add_argument("--arch", default="llama", choices=["llama", "gpt2", "phi3"])
    p.add_argument("--data", action="append", default=[], metavar="FILE",
                   help="A JSONL file to train the tokenizer on (prompt/completion, text or messages rows); repeat "
                   "--data for more files.")
    p.add_argument("--hidden-size", type=_positive_int, default=128)
    p.add_argument("--layers", type=_positive_int, default=2)
    p.add_argument("--intermediate-size", type=_positive_int, default=None)
    p.set_defaults(func=_tiny_model)
    p = sub.add_parser("merge", help="Merge a (Q)LoRA adapter into the dequantized base it was trained against "
                       "and write an ordinary transformers model (see docs/merge.md).")
    p.add_argument("--adapter", required=True, help="Adapter folder (a training output_dir or checkpoint-N).")
    p.add_argument("--base", help="Base model folder or Hub id. Default: the base recorded in the adapter.")
    p.add_argument("--out", required=True, help="Folder for the merged model (must not exist, or be empty).")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="Default: the base's dtype.")
    p.add_argument("--force", action="store_true", help="Replace an earlier merge's output at --out (never an input "
                   "or a folder merge did not write).")
    p.add_argument("--trained_on", choices=["4bit", "16bit"], help="For an adapter without qlora_plugin_quantization"
                   ".json: whether training held the base in 4-bit (QLoRA) or 16-bit (LoRA).")
    p.add_argument("--bnb_4bit_quant_type", choices=["nf4", "fp4"], help="Override the recorded 4-bit type.")
    p.add_argument("--use_bnb_nested_quant", type=parse_bool, metavar="true|false",
                   help="Override the recorded double quantization.")
    p.add_argument("--max_shard_size", default="2GB", help="Largest output shard (default 2GB).")
    p.add_argument("--eval_data", metavar="FILE.jsonl", help="Prompts for the fidelity check (text, prompt+completion "
                   "or messages rows; default: a few built-in prompts).")
    p.add_argument("--no_check", action="store_true", help="Skip the fidelity check (it loads the merged model, "
                   "the adapter on the 4-bit base and a naive merge, one at a time).")
    p.set_defaults(func=_merge)
    p = sub.add_parser("run", help="Run a command (your training script) with glibc's malloc settings for CPU "
                       "training: about a third lower peak memory (docs/troubleshooting.md, problem 11).")
    p.add_argument("command", nargs=argparse.REMAINDER, help="The command, after `--`: run -- python train.py ...")
    p.set_defaults(func=_run)
    p = sub.add_parser("plan", add_help=False, help="Predict peak training memory from config.json (docs/plan.md).")
    p.set_defaults(func=_plan)
    parser.command_names = tuple(sub.choices)  # for the one-line answer to a command that does not exist
    return parser


def _plan(args, rest) -> int:
    from qlora_plugin.plan.cli import main as plan_main  # each command loads only its own stack

    return plan_main(rest)


def _unknown_command(parser: argparse.ArgumentParser, argv: list[str]) -> str | None:
    """One line for a command that does not exist (`qlora-plugin strategy`), with the nearest one; argparse's own
    "invalid choice" lists them all and suggests none (before Python 3.14)."""
    commands = parser.command_names
    word = next((a for a in argv if not a.startswith("-")), None)
    if word is None or word in commands:
        return None
    near = difflib.get_close_matches(word, commands, n=1, cutoff=0.6)
    hint = f"did you mean `qlora-plugin {near[0]}`? " if near else ""
    return f"unknown command {word!r}: {hint}The commands are: {', '.join(commands)}."


def main(argv=None) -> int:
    leave_out_for_a_command()  # bitsandbytes' CPU kernel note (never used here), the Hub's retries as one line
    refuse_hub_kernels()  # ... and never with a kernel fetched from the Hub
    parser = make_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    unknown = _unknown_command(parser, argv[:1])
    if unknown:
        print(f"qlora-plugin: error: {unknown}", file=sys.stderr)
        return 2
    args, rest = parser.parse_known_args(argv)
    if args.func is not _plan and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.func(args, rest) if args.func is _plan else args.func(args)
    except QLoRAPluginError as err:
        print(f"qlora-plugin: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `qlora-plugin strategies | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
