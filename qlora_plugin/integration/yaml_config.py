"""TRL's `--config FILE` YAML, read at activation for the plugin's own keys (`strategy`, options, `qlora_hooks`).

A file that cannot be used is not an error here: with no strategy anywhere the plugin stays out of the way and
TRL reports the file itself. `read` returns the problem so activation can say it in plain words when a strategy
*is* active (from the command line or the environment), instead of TRL's traceback.
"""

from __future__ import annotations


def read(argv: list[str]) -> tuple[dict, str | None]:
    """(the mapping in `--config FILE`, None), or ({}, what is wrong with it). ({}, None) without `--config`."""
    if "--config" not in argv:
        return {}, None
    index = argv.index("--config")
    if index + 1 >= len(argv) or argv[index + 1].startswith("--"):
        return {}, "`--config` needs the path of a YAML file, e.g. `--config sft.yaml`."
    path = argv[index + 1]
    try:
        import yaml

        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f)
    except OSError as err:
        return {}, (f"The config file {path!r} cannot be read ({err.strerror or err}). Pass an existing YAML file "
                    "to `--config`.")
    except (ValueError, yaml.YAMLError) as err:  # UnicodeDecodeError is a ValueError
        reason = " ".join(str(err).split())
        return {}, f"The config file {path!r} is not valid YAML ({reason}). Fix the file, e.g. with `yamllint`."
    if not isinstance(config, dict):
        return {}, (f"The config file {path!r} must hold a YAML mapping of `key: value` lines (e.g. "
                    f"`strategy: qlora`); it holds {type(config).__name__}.")
    odd = [key for key in config if not isinstance(key, str)]
    if odd:
        return {}, (f"The keys of the config file {path!r} must be names such as `lora_r`; got {odd[0]!r}. "
                    "Quote it or fix the line.")
    if "env" in config and not isinstance(config["env"], dict):
        return {}, (f"`env` in the config file {path!r} must be a mapping of environment variables "
                    f"(e.g. `env: {{QLORA_PLUGIN_STRATEGY: qlora}}`); got {config['env']!r}.")
    return config, None
