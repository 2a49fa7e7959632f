"""A `sys.meta_path` finder that runs a callback right after a named module is first imported. Standard library
only: the process start-up hook (`bootstrap`) installs it before anything else is imported."""

import sys

from qlora_plugin.ecosystem.hub_code import spec_from_the_other_finders

DISABLE_ENV = "QLORA_PLUGIN_DISABLE"  # set to 1: the start-up hook installs nothing (bootstrap)


class _LoaderProxy:
    """Runs `callback(module)` right after the real loader executes a watched module; otherwise transparent."""

    def __init__(self, loader, callback):
        self._loader = loader
        self._callback = callback

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._callback(module)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class PostImportWatcher:
    """A `sys.meta_path` finder that calls a function after a named module is first imported."""

    def __init__(self):
        self.callbacks = {}

    def watch(self, module_name, callback):
        if module_name in sys.modules:
            callback(sys.modules[module_name])
        else:
            self.callbacks[module_name] = callback

    def find_spec(self, fullname, path=None, target=None):
        callback = self.callbacks.get(fullname)
        if callback is None:
            return None
        spec = spec_from_the_other_finders(self, fullname, path, target)
        if spec is not None:
            del self.callbacks[fullname]
            spec.loader = _LoaderProxy(spec.loader, callback)
        return spec


def watcher() -> PostImportWatcher:
    for finder in sys.meta_path:
        if isinstance(finder, PostImportWatcher):
            return finder
    finder = PostImportWatcher()
    sys.meta_path.insert(0, finder)
    return finder
