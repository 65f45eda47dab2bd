"""The backend of a tile-INT4 base (:class:`~peft_balanced.quant.TileInt4Linear`)."""

from __future__ import annotations

import torch
from torch import nn

from ..ops import expand_blocks
from .base import Backend

__all__ = ["TileInt4Backend"]


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
