"""What a script's parser returns while a strategy is active: TRL's QLoRA/LoRA fields hold the run's values.

Why: activation takes the plugin's keys (`--lora_r`, `load_in_4bit: true`, ...) out of the command line and the
YAML file, so any parser accepts the rest. A script that builds its configs from TRL's `ModelConfig`
(`get_quantization_config(model_args)`, `get_peft_config(model_args)`) must still see what the user wrote and,
for what they did not write, what the strategy uses; otherwise its 16-bit defaults would load a model the
strategy then refuses. After `HfArgumentParser` parses (transformers' class, and the copy TRL 1.x vendors as the
base of `TrlParser`), every returned dataclass with TRL's field names gets the effective values
(`strategies.trl_args`).
"""

from __future__ import annotations

import functools

from qlora_plugin.integration import state

PARSE_METHODS = ("parse_args_into_dataclasses", "parse_dict")  # parse_yaml_file and parse_json_file use parse_dict


def patch_argument_parser(module) -> None:
    cls = module.HfArgumentParser
    for name in PARSE_METHODS:
        original = getattr(cls, name)
        if not getattr(original, "_qlora_plugin", False):
            setattr(cls, name, _filling(original))


def _filling(original):
    @functools.wraps(original)
    def parse(self, *args, **kwargs):
        outputs = original(self, *args, **kwargs)
        request = state.active_request()
        if request is not None:
            # Imported at the first parse, not at `import trl`: resolving the options loads the plugins.
            from qlora_plugin.strategies.trl_args import fill_parsed
            from qlora_plugin.training.loading import resolve

            fill_parsed([o for o in outputs if hasattr(o, "__dataclass_fields__")], resolve(request)[2])
        return outputs

    parse._qlora_plugin = True
    return parse
