"""QA-BLoRA layers: a ``TileInt4Linear`` base plus one tile-grid matrix ``H`` per adapter; merges stay 4-bit."""

from __future__ import annotations

import math
import warnings

import torch
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from ...quant.linear import TileInt4Linear
from ..balanced import BalancedAdapterLayer
from ..layer import AdapterLinear, dropout_module
from .config import QABLoRAConfig


def quantize_hint(tile: tuple[int, int]) -> str:
    """How to get ``TileInt4Linear`` layers with ``tile`` (for error messages)."""
    tile = tuple(tile)
    return (
        f"quantize the full-precision model with `peft_balanced.quant.quantize_model(model, tile={tile})`, or load "
        f"it with `from_pretrained(..., quantization_config=peft_balanced.quant.TileInt4Config(tile={tile}))`"
    )


def check_qablora_base(module: nn.Module, tile: tuple[int, int], name: str) -> None:
    """Raise unless ``module`` is a ``TileInt4Linear`` quantized with ``tile`` (the only base QA-BLoRA can merge into).

    ``TypeError`` for another module type (``nn.Linear``, bitsandbytes NF4/INT8, ...), ``ValueError`` for a
    ``TileInt4Linear`` with other tiles. Both messages name the module and say how to quantize first.
    """
    tile = tuple(tile)
    if isinstance(module, TileInt4Linear):
        if tuple(module.tile) != tile:
            raise ValueError(
                f"QA-BLoRA cannot adapt module {name!r}: it is quantized with tile={tuple(module.tile)} but "
                f"QABLoRAConfig.tile={tile}; the adapter's tiles must be the quantization tiles so that a merge only "
                f"shifts each tile's zero point. Set QABLoRAConfig(tile={tuple(module.tile)}), or "
                f"{quantize_hint(tile)}."
            )
        return
    raise TypeError(
        f"QA-BLoRA cannot adapt module {name!r} of type {type(module).__name__}: it needs a 4-bit TileInt4Linear "
        f"base with tile={tile} (one scale and zero point per tile, so that merging keeps the model 4-bit; "
        "nn.Linear, bitsandbytes NF4/INT8 and 1-D-group formats cannot host the merge). First "
        f"{quantize_hint(tile)}; or remove {name!r} from target_modules (BLoRA adapts other bases)."
    )


class QABLoRALayer(BalancedAdapterLayer):
    """State shared by QA-BLoRA layers: per adapter ``qab_H: (D_out/λ2, D_in/λ1)``, its scaling and tile."""

    adapter_layer_names: tuple[str, ...] = ("qab_H",)
    other_param_names: tuple[str, ...] = ("lora_alpha", "scaling", "tile", "qab_dropout")
    method_name = "QA-BLoRA"

    def _init_adapter_state(self) -> None:
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.tile: dict[str, tuple[int, int]] = {}
        self.qab_dropout = nn.ModuleDict({})
        self.qab_H = nn.ParameterDict({})
        # β of the base before the first merge (same dtype): unmerge restores it bit-exactly. A plain attribute, not
        # a buffer, so that module dtype casts cannot re-round it; it is never saved.
        self._zero_before_merge: torch.Tensor | None = None

    def update_layer(self, adapter_name: str, config: QABLoRAConfig, inference_mode: bool = False) -> None:
        """Create (or replace) the adapter ``adapter_name`` on this layer."""
        check_qablora_base(self.get_base_layer(), config.tile, self.module_name)  # its shape then fits the tile
        l1, l2 = config.tile
        self.lora_alpha[adapter_name] = config.lora_alpha
        self.scaling[adapter_name] = config.scaling
        self.tile[adapter_name] = (l1, l2)
        self.qab_dropout[adapter_name] = dropout_module(config.lora_dropout)
        self.qab_H[adapter_name] = nn.Parameter(torch.zeros(self.out_features // l2, self.in_features // l1))
        self._finish_update(adapter_name, config.init_weights, inference_mode)

    @torch.no_grad()
    def reset_parameters(self, adapter_name: str, init_weights: bool) -> None:
        """``H = 0`` (``init_weights=True``) or ``U(-1/sqrt(D_in/λ1), 1/sqrt(D_in/λ1))`` like ``nn.Linear``."""
        h = self.qab_H[adapter_name]
        if init_weights:
            h.zero_()
        else:
            nn.init.kaiming_uniform_(h, a=math.sqrt(5))

    def balanced_weights(self, adapter_name: str) -> list[torch.Tensor]:
        return [self.qab_H[adapter_name]]

    def balanced_factors(self, adapter_name: str) -> tuple[int, int]:
        return self.tile[adapter_name]

    def balanced_dropout(self, adapter_name: str) -> nn.Module:
        return self.qab_dropout[adapter_name]

    def get_delta_zero(self, adapter_name: str) -> torch.Tensor:
        """Per-tile zero-point shift ``s · H / λ1``: ``(D_out/λ2, D_in/λ1)``, float32."""
        return self.qab_H[adapter_name].detach().float() * (self.scaling[adapter_name] / self.tile[adapter_name][0])

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Merge the active (or the given) adapters into the zero points: ``β ← β0 + Σ s·H/λ1`` per tile.

        The base stays a 4-bit ``TileInt4Linear``. ``β0`` (the zero points before the first merge) is kept, and
        every merge recomputes ``β0 + Σ_merged s·H/λ1`` in float32 and rounds it once into β's dtype (via
        ``add_to_zero``), so merging adapters one after another gives the same bits as merging them together.
        The result is always checked for NaN/inf (in β's dtype) before anything changes, so ``safe_merge`` is
        accepted for API compatibility only.
        """
        adapter_names = [n for n in check_adapters_to_merge(self, adapter_names) if n in self.qab_H]
        if not adapter_names:
            return
        base = self.get_base_layer()
        before = self._zero_before_merge if self.merged else base.zero.detach().clone()
        total = sum(self.get_delta_zero(n) for n in self.merged_adapters + adapter_names)
        total = total.to(base.zero.device)
        merged = before.float() + total
        if not bool(torch.isfinite(merged.to(base.zero.dtype)).all()):
            raise ValueError(
                f"Merging adapter(s) {adapter_names} into module {self.module_name!r} gives NaN or inf zero points "
                f"(in {base.zero.dtype}); the adapter is broken or too large for this zero-point dtype."
            )
        self._zero_before_merge = before
        base.zero.copy_(before)
        base.add_to_zero(total)
        self.merged_adapters.extend(adapter_names)

    def unmerge(self) -> None:
        """Restore the zero points saved before the first merge (bit-exact)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base = self.get_base_layer()
        with torch.no_grad():
            base.zero.copy_(self._zero_before_merge)
        self._zero_before_merge = None
        self.merged_adapters.clear()


class QABLoRALinear(AdapterLinear, QABLoRALayer):
    """A ``TileInt4Linear`` with QA-BLoRA adapters: ``y = base(x) + Σ_active s·expand_λ2(H pool_λ1(x))``."""

    repr_prefix = "qablora"
