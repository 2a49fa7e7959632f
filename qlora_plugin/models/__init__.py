"""Models read or built without training: a model's `config.json` read without its weights (`plan` and `merge` build
their meta-device skeletons from it) and the tiny offline model of `qlora-plugin tiny-model`."""
