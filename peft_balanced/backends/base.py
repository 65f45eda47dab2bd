"""The base class of our quantization backends: peft's ``QuantizationBackend`` plus the hooks our tuners call."""

from __future__ import annotations

from typing import Any

import torch
from peft.utils.quantization_utils import QuantizationBackend
from torch import nn

__all__ = ["Backend", "dequantize_add_set"]


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
        dequantize_add_set(peft_layer, adapter_name, delta, check_finite)


def dequantize_add_set(peft_layer: nn.Module, adapter_name: str, delta: torch.Tensor, check_finite: bool) -> None:
    """The merge of a backend without a merge of its own: dequantize the base, add ``delta``, store it back."""
    weight = peft_layer.get_base_weight()
    merged = weight.float() + delta.to(weight.device)
    if check_finite and not torch.isfinite(merged).all():
        raise ValueError(
            f"NaNs or infs in the merged weight of module {peft_layer.module_name!r}; adapter {adapter_name!r} is "
            "broken."
        )
    peft_layer.set_base_weight(merged.to(weight.dtype))
