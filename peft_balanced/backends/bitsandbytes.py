"""The backend of a bitsandbytes 4-bit base: peft's, made safe on CPU and fast for NF4 training on CUDA (the NF4
kernel it runs is :mod:`.nf4`)."""

from __future__ import annotations

import sys
from typing import Any

import torch
from peft.utils.quantization_utils import Bnb4bitBackend as _PeftBnb4bitBackend
from torch import nn

from .._compat import get_in_out_features, unpack_bnb_cpu_weight
from .base import Backend
from .nf4 import nf4_linear, uses_fast_nf4

__all__ = ["FastBnb4bitBackend", "is_bnb_linear4bit", "undo_bnb_cpu_repack"]


class FastBnb4bitBackend(Backend, _PeftBnb4bitBackend):
    """A bitsandbytes ``Linear4bit`` base: peft's backend, made safe on CPU and fast for NF4 training on CUDA.

    * ``prepare`` stops the AVX512-BF16 CPU repack (after which training gets no input gradient and a dequantize is
      garbage) and undoes one already done; ``get_base_weight`` undoes it too.
    * ``forward`` runs :func:`~peft_balanced.backends.nf4.nf4_linear` (one Triton dequantize, then cuBLAS) for
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


def is_bnb_linear4bit(module: nn.Module) -> bool:
    bnb = sys.modules.get("bitsandbytes")  # a Linear4bit exists only once bitsandbytes is imported
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)
