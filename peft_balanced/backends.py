"""Quantization backends: how an adapter layer reads, updates and runs the base layer it wraps.

peft's newer tuners hold one ``QuantizationBackend`` per layer (``peft.utils.quantization_utils``: the base weight,
whether it can be merged into, and a defensive clone of the base output) instead of one layer class per
quantization library. Ours have the same shape plus what our tuners ask of a base (:class:`Backend`):
``prepare`` (once, when an adapter wraps the base), ``forward`` (the base output, where a faster kernel may run)
and ``merge_delta`` (an in-place merge of a full update ``ΔW``).

:func:`resolve_backend` is the one place a base layer gets its backend: ours first (tile-INT4, bitsandbytes 4-bit
with the fast NF4 path), then peft's (bitsandbytes 8-bit, HQQ, torchao, GPTQ, ...). ``None`` means a plain
``nn.Linear``. The helpers below accept any of them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from peft.utils.quantization_utils import Bnb4bitBackend as _PeftBnb4bitBackend
from peft.utils.quantization_utils import QuantizationBackend, resolve_quantization_backend
from torch import nn

from ._compat import get_in_out_features, unpack_bnb_cpu_weight
from .ops import expand_blocks
from .quant.kernels.nf4 import nf4_linear, uses_fast_nf4
from .quant.linear import TileInt4Linear

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


class Backend(QuantizationBackend):
    """peft's ``QuantizationBackend`` plus the hooks our tuner layers call. Subclasses set ``backend_name``,
    ``layer_type`` and ``supports_merge`` and implement ``get_base_weight`` (and ``set_base_weight`` or
    ``merge_delta`` if they merge)."""

    layer_type = "linear"

    def prepare(self, base_layer: nn.Module) -> None:
        """Called once when an adapter layer wraps ``base_layer``."""

    def in_out_features(self, base_layer: nn.Module) -> tuple[int | None, int | None]:
        """``(D_in, D_out)`` of ``base_layer``."""
        return getattr(base_layer, "in_features", None), getattr(base_layer, "out_features", None)

    def forward(self, base_layer: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base output ``base_layer(x)``, as a tensor the caller may add to."""
        return self.maybe_clone_base_result(base_layer(x, *args, **kwargs))

    def merge_delta(self, peft_layer: nn.Module, adapter_name: str, delta: torch.Tensor, check_finite: bool) -> None:
        """Add ``delta: (D_out, D_in)`` (float32) to the base weight: dequantize, add, ``set_base_weight``."""
        _dequantize_add_set(peft_layer, adapter_name, delta, check_finite)


class TileInt4Backend(Backend):
    """A :class:`~peft_balanced.quant.TileInt4Linear` base. Dequantizes for ``merge_and_unload(dequantize=True)``;
    merges in place only an update that is constant on every quantization tile, by shifting each tile's zero point
    (the model stays 4-bit and nothing is re-quantized; e.g. BLoRA with ``balance_factor`` a multiple of both ``l1``
    and ``l2``). Any other update raises: re-quantizing would add error silently."""

    backend_name = "tile int4"
    supports_merge = True

    def get_base_weight(self, base_layer: nn.Module) -> torch.Tensor:
        return base_layer.dequantize(base_layer.compute_dtype)

    def set_base_weight(self, peft_layer: nn.Module, weight_data: torch.Tensor) -> None:
        raise TypeError("tile int4 layers are not re-quantized; merge_delta shifts their zero points instead")

    def merge_delta(self, peft_layer: nn.Module, adapter_name: str, delta: torch.Tensor, check_finite: bool) -> None:
        base = peft_layer.get_base_layer()
        if not torch.isfinite(delta).all():  # checked whatever check_finite says: zero points must stay finite
            raise ValueError(
                f"NaNs or infs in the update of module {peft_layer.module_name!r}; adapter {adapter_name!r} is broken."
            )
        l1, l2 = base.tile
        per_tile = delta[::l2, ::l1]
        if not torch.equal(expand_blocks(per_tile, l2, l1), delta):
            raise TypeError(
                f"Cannot merge adapter {adapter_name!r} into module {peft_layer.module_name!r} in place: its update "
                f"is not constant on the tile={base.tile} tiles of the tile int4 base, which can only shift each "
                "tile's zero point (re-quantizing would add error). Use merge_and_unload(dequantize=True) for a "
                "16/32-bit model, or an adapter whose update is constant per tile (QA-BLoRA with the same tile, "
                "BLoRA with a balance_factor that is a multiple of both l1 and l2)."
            )
        base.add_to_zero(per_tile)  # checks that the result is finite


class FastBnb4bitBackend(Backend, _PeftBnb4bitBackend):
    """A bitsandbytes ``Linear4bit`` base: peft's backend, made safe on CPU and fast for NF4 training on CUDA.

    * ``prepare`` stops the AVX512-BF16 CPU repack (after which training gets no input gradient and a dequantize is
      garbage) and undoes one already done; ``get_base_weight`` undoes it too.
    * ``forward`` runs :func:`~peft_balanced.quant.kernels.nf4.nf4_linear` (one Triton dequantize, then cuBLAS) for
      NF4 weights on CUDA above a few tokens, when the kernel preference allows it (``"auto"``).
    """

    backend_name = "bnb 4bit"

    def prepare(self, base_layer: nn.Module) -> None:
        if hasattr(base_layer, "support_avx512bf16_for_cpu"):
            base_layer.support_avx512bf16_for_cpu = False
        undo_bnb_cpu_repack(base_layer)

    def in_out_features(self, base_layer: nn.Module) -> tuple[int | None, int | None]:
        return get_in_out_features(base_layer)

    def get_base_weight(self, base_layer: nn.Module) -> torch.Tensor:
        undo_bnb_cpu_repack(base_layer)
        return super().get_base_weight(base_layer)

    def forward(self, base_layer: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not args and not kwargs and uses_fast_nf4(base_layer, x):
            return nf4_linear(base_layer, x)  # a fresh output: no defensive clone needed
        return super().forward(base_layer, x, *args, **kwargs)


def undo_bnb_cpu_repack(module: nn.Module) -> None:
    """Restore the standard layout of a bitsandbytes 4-bit weight that a CPU forward repacked in place.

    On CPUs with AVX512-BF16, bitsandbytes repacks a ``Linear4bit`` weight into a CPU-specific layout during an
    eval-mode forward; dequantizing that layout with the generic path gives silently wrong values. Layers that are
    not repacked are left untouched.
    """
    weight = getattr(module, "weight", None)
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is None or not getattr(quant_state, "packing_format_for_cpu", False):
        return
    weight.data, weight.quant_state = unpack_bnb_cpu_weight(weight.data, quant_state)


def _is_bnb_linear4bit(module: nn.Module) -> bool:
    bnb = sys.modules.get("bitsandbytes")  # a Linear4bit exists only once bitsandbytes is imported
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


_BACKENDS: list[tuple[Callable[[nn.Module], bool], Callable[[], Backend]]] = [
    (lambda module: isinstance(module, TileInt4Linear), TileInt4Backend),
    (_is_bnb_linear4bit, FastBnb4bitBackend),
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
        _dequantize_add_set(peft_layer, adapter_name, delta, check_finite)


def _dequantize_add_set(peft_layer: nn.Module, adapter_name: str, delta: torch.Tensor, check_finite: bool) -> None:
    weight = peft_layer.get_base_weight()
    merged = weight.float() + delta.to(weight.device)
    if check_finite and not torch.isfinite(merged).all():
        raise ValueError(
            f"NaNs or infs in the merged weight of module {peft_layer.module_name!r}; adapter {adapter_name!r} is "
            "broken."
        )
    peft_layer.set_base_weight(merged.to(weight.dtype))
