"""Start-up hook, loaded standalone by ``peft_balanced_startup.pth`` (without importing the package).

peft has no plugin mechanism, so a process that loads an adapter of one of our types without
``import peft_balanced`` would end in a bare ``KeyError: 'BLORA'``. This hook, which imports nothing heavy, waits
for ``peft.mapping`` to be imported and gives its type-to-class tables a ``__missing__`` that names the plugin.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

_OWNED = ("BLORA", "QABLORA", "GRADAPPROX")
_TABLES = ("PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING")


class _PluginAwareMapping(dict):
    """A peft type-to-class table that explains how to get peft-balanced's types when they are missing."""

    def __missing__(self, key: object):
        name = getattr(key, "value", key)
        if name in _OWNED:
            raise KeyError(
                f"{name}: this adapter type comes from the peft-balanced plugin. Run `import peft_balanced` "
                "before creating or loading it (peft has no plugin mechanism to do that for you)."
            )
        raise KeyError(key)


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        for table in _TABLES:
            current = getattr(module, table, None)
            if isinstance(current, dict) and not isinstance(current, _PluginAwareMapping):
                setattr(module, table, _PluginAwareMapping(current))


class _PeftMappingFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != "peft.mapping":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _PatchingLoader(spec.loader)
        return spec


def install() -> None:
    """Install the hook once (no-op if peft.mapping is already imported)."""
    # The .pth file may be read twice (e.g. through a lib64 -> lib link), each time with a fresh module: compare
    # by name, not by class.
    if "peft.mapping" in sys.modules or any(type(f).__name__ == "_PeftMappingFinder" for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _PeftMappingFinder())
