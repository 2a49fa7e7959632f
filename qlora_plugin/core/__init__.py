"""The vocabulary every layer shares, with no machine-learning library: errors, sizes, options, files, strategies,
requests, the plugin's flags and the TRL trainers a strategy applies to.

The lowest layer of the package (docs/architecture.md): it imports nothing else from `qlora_plugin`.
"""
