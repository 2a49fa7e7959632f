"""Ready hooks shipped with the package. None is loaded unless named: `--qlora_hooks qdora`, the YAML key
`qlora_hooks: [qdora]`, or `QLORA_PLUGIN_HOOKS=qdora`; `qlora-plugin strategies` lists them."""
