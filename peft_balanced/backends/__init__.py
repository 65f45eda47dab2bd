"""Quantization backends: how an adapter layer reads, updates and runs the base layer it wraps.

peft's newer tuners hold one ``QuantizationBackend`` per layer (``peft.utils.quantization_utils``: the base weight,
whether it can be merged into, and a defensive clone of the base output) instead of one layer class per
quantization library. Ours have the same shape plus what our tuners ask of a base (:class:`Backend`):
``prepare`` (once, when an adapter wraps the base), ``forward`` (the base output, where a faster kernel may run)
and ``merge_delta`` (an in-place merge of a full update ``ΔW``).

:func:`resolve_backend` is the one place a base layer gets its backend: ours first (tile-INT4, bitsandbytes 4-bit
with the fast NF4 path), then peft's (bitsandbytes 8-bit, HQQ, torchao, GPTQ, ...). ``None`` means a plain
``nn.Linear``. The helpers below accept any of them.

* :mod:`.base`: :class:`Backend`, the hooks.
* :mod:`.tile_int4`: tile-INT4 bases (an update constant per tile merges into the zero points).
* :mod:`.bitsandbytes`: bitsandbytes 4-bit bases, and beside it :mod:`.nf4`: the Triton NF4 dequantize and the linear
  built on it that its forward runs on CUDA.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from peft.utils.quantization_utils import QuantizationBackend, resolve_quantization_backend
from torch import nn

from .._compat import get_in_out_features
from ..quant.linear import TileInt4Linear
from .base import Backend, dequantize_add_set
from .bitsandbytes import FastBnb4bitBackend, is_bnb_linear4bit
from .tile_int4 import TileInt4Backend

__all__ = [
    "Backend",
    "FastBnb4bitBackend",
    "TileInt4Backend",
    "base_forward",
    "in_out_features",
    "is_linear_base",
    "merge_delta",
    "prepare_base",
    "register_backend",
    "resolve_backend",
]


_BACKENDS: list[tuple[Callable[[nn.Module], bool], Callable[[], Backend]]] = [
    (lambda module: isinstance(module, TileInt4Linear), TileInt4Backend),
    (is_bnb_linear4bit, FastBnb4bitBackend),
]


def register_backend(matches: Callable[[nn.Module], bool], factory: Callable[[], Backend]) -> None:
    """Give base layers for which ``matches(module)`` is true the backend ``factory()``, before every other."""
    _BACKENDS.insert(0, (matches, factory))


def resolve_backend(base_layer: nn.Module, **kwargs: Any) -> QuantizationBackend | None:
    """The backend of ``base_layer``: ours first, then peft's; ``None`` for a plain (not quantized) layer.

    ``kwargs`` go to peft's resolver (``get_apply_tensor_subclass`` for torchao).
    """
    for matches, factory in _BACKENDS:
        if matches(base_layer):
            return factory()
    return resolve_quantization_backend(base_layer, **kwargs)


def is_linear_base(module: nn.Module) -> bool:
    """``True`` for ``nn.Linear`` and every quantized linear a backend exists for: the bases a tuner's one linear
    layer class wraps."""
    if isinstance(module, nn.Linear):
        return True
    backend = resolve_backend(module)
    return backend is not None and backend.layer_type == "linear"


def prepare_base(backend: QuantizationBackend | None, base_layer: nn.Module) -> None:
    """Run ``backend``'s preparation of ``base_layer`` (only ours have one)."""
    if isinstance(backend, Backend):
        backend.prepare(base_layer)


def in_out_features(backend: QuantizationBackend | None, base_layer: nn.Module) -> tuple[int | None, int | None]:
    """``(D_in, D_out)`` of ``base_layer``, or ``(None, None)`` if unknown."""
    if isinstance(backend, Backend):
        return backend.in_out_features(base_layer)
    return get_in_out_features(base_layer)


def base_forward(
    backend: QuantizationBackend | None, base_layer: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any
) -> torch.Tensor:
    """The base output for ``x`` through ``backend`` (a fast kernel where ours have one; peft's defensive clone)."""
    if isinstance(backend, Backend):
        return backend.forward(base_layer, x, *args, **kwargs)
    result = base_layer(x, *args, **kwargs)
    return result if backend is None else backend.maybe_clone_base_result(result)


def merge_delta(peft_layer: nn.Module, adapter_name: str, delta: torch.Tensor, check_finite: bool) -> None:
    """Add ``delta: (D_out, D_in)`` (float32) to ``peft_layer``'s base weight, through its backend."""
    backend = peft_layer.quantization_backend
    if backend is not None and not backend.supports_merge:
        raise TypeError(
            f"Cannot merge into module {peft_layer.module_name!r} in place: {backend.backend_name} layers cannot be "
            "updated. Use merge_and_unload(dequantize=True)."
        )
    if isinstance(backend, Backend):
        backend.merge_delta(peft_layer, adapter_name, delta, check_finite)
    else:
        dequantize_add_set(peft_layer, adapter_name, delta, check_finite)
