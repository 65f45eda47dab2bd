"""Start-up hook, loaded standalone by ``peft_balanced_startup.pth`` (without importing the package).

peft and transformers have no plugin mechanism, so a process that loads one of our artefacts without
``import peft_balanced`` would go wrong: peft ends in a bare ``KeyError: 'BLORA'`` for an adapter, and transformers
logs "Unknown quantization type" for a saved ``tile_int4`` model, skips the quantization and returns random weights
in place of the 4-bit layers. This hook, which imports nothing heavy, waits for ``peft.mapping`` and
``transformers.quantizers.auto`` to be imported and makes both lookups raise an error that names the plugin.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable
from types import ModuleType

#: The PEFT types and the quantization method this package owns: the one list of their names.
OWNED_PEFT_TYPES: tuple[str, ...] = ("BLORA", "QABLORA", "GRADAPPROX")
OWNED_QUANT_METHODS: tuple[str, ...] = ("tile_int4",)
_TABLES = ("PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING")


class _PluginAwareMapping(dict):
    """A peft type-to-class table that explains how to get peft-balanced's types when they are missing."""

    def __missing__(self, key: object):
        name = getattr(key, "value", key)
        if name in OWNED_PEFT_TYPES:
            raise KeyError(
                f"{name}: this adapter type comes from the peft-balanced plugin. Run `import peft_balanced` "
                "before creating or loading it (peft has no plugin mechanism to do that for you)."
            )
        raise KeyError(key)


def _patch_peft_mapping(module: ModuleType) -> None:
    for table in _TABLES:
        current = getattr(module, table, None)
        if isinstance(current, dict) and not isinstance(current, _PluginAwareMapping):
            setattr(module, table, _PluginAwareMapping(current))


def _check_quant_method(auto: ModuleType, config: object) -> None:
    """Raise if ``config`` (a dict or a config object) names one of our quantization methods that is not registered."""
    method = config.get("quant_method") if isinstance(config, dict) else getattr(config, "quant_method", None)
    method = getattr(method, "value", method)
    if method in OWNED_QUANT_METHODS and method not in getattr(auto, "AUTO_QUANTIZATION_CONFIG_MAPPING", {}):
        raise ValueError(
            f"This model is quantized with quant_method={method!r}, which comes from the peft-balanced plugin. Run "
            "`import peft_balanced` before from_pretrained (transformers has no plugin mechanism to do that for you; "
            "without it, it would skip the quantization and fill the 4-bit layers with random weights)."
        )


def _guarded(check: Callable[[object], None], function: Callable, index: int) -> Callable:
    """``function`` that first calls ``check`` on its argument number ``index`` (the quantization config)."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        check(args[index] if len(args) > index else next(iter(kwargs.values()), None))
        return function(*args, **kwargs)

    wrapper.__peft_balanced_guard__ = True
    return wrapper


def _patch_quantizer_lookup(module: ModuleType) -> None:
    """Guard ``AutoHfQuantizer.supports_quant_method`` (which would skip an unknown method silently) and
    ``AutoQuantizationConfig.from_dict``."""
    check = functools.partial(_check_quant_method, module)
    for cls_name, attr, kind in (
        ("AutoHfQuantizer", "supports_quant_method", staticmethod),
        ("AutoQuantizationConfig", "from_dict", classmethod),
    ):
        cls = getattr(module, cls_name, None)
        descriptor = getattr(cls, "__dict__", {}).get(attr)
        if not isinstance(descriptor, kind) or getattr(descriptor.__func__, "__peft_balanced_guard__", False):
            continue
        index = 0 if kind is staticmethod else 1  # a classmethod's function takes the class first
        setattr(cls, attr, kind(_guarded(check, descriptor.__func__, index)))


_PATCHES: dict[str, Callable[[ModuleType], None]] = {
    "peft.mapping": _patch_peft_mapping,
    "transformers.quantizers.auto": _patch_quantizer_lookup,
}


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader, patch: Callable[[ModuleType], None]) -> None:
        self._loader = loader
        self._patch = patch

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        self._patch(module)


class _PatchingFinder(importlib.abc.MetaPathFinder):
    """Patches each module of ``_PATCHES`` right after its first import; leaves ``sys.meta_path`` when all are done."""

    def __init__(self, pending: set[str]) -> None:
        self._pending = pending

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self._pending:
            return None
        self._pending.discard(fullname)
        if not self._pending:
            sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _PatchingLoader(spec.loader, _PATCHES[fullname])
        return spec


def install() -> None:
    """Install the hook once; modules already imported are patched at once."""
    # The .pth file may be read twice (e.g. through a lib64 -> lib link), each time with a fresh module: compare
    # by name, not by class.
    if any(type(f).__name__ == "_PatchingFinder" for f in sys.meta_path):
        return
    pending = set()
    for name, patch in _PATCHES.items():
        if name in sys.modules:
            patch(sys.modules[name])
        else:
            pending.add(name)
    if pending:
        sys.meta_path.insert(0, _PatchingFinder(pending))
