"""BLoRA layers: one class for nn.Linear and every quantized linear peft has a backend for (bnb 4/8-bit, ...)."""

from __future__ import annotations

import math
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features
from peft.utils import quantization_extra_repr, resolve_quantization_backend
from torch import nn

from ...ops import add_balanced_adapter, add_expanded, expand, expand_blocks, pool
from ..common import (
    AdditiveAdapterForward,
    DeltaWeightMerge,
    check_adapter_shapes_on_load,
    guard_bnb_cpu_repack,
)
from .config import BLoRAConfig


class BLoRALayer(DeltaWeightMerge, BaseTunerLayer):
    """State shared by BLoRA layers: per adapter ``bal_A: (λr, D_in/λ)``, ``bal_B: (D_out/λ, λr)``."""

    adapter_layer_names: tuple[str, ...] = ("bal_A", "bal_B")
    other_param_names: tuple[str, ...] = ("r", "balance_factor", "lora_alpha", "scaling", "bal_dropout")

    def __init__(self, base_layer: nn.Module, module_name: str = "", **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.module_name = module_name
        self.quantization_backend = resolve_quantization_backend(
            self.get_base_layer(), get_apply_tensor_subclass=kwargs.get("get_apply_tensor_subclass")
        )
        self.r: dict[str, int] = {}
        self.balance_factor: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.bal_dropout = nn.ModuleDict({})
        self.bal_A = nn.ModuleDict({})
        self.bal_B = nn.ModuleDict({})
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs
        guard_bnb_cpu_repack(self.get_base_layer())
        in_features, out_features = _get_in_out_features(self.get_base_layer())
        if in_features is None:
            raise TypeError(f"BLoRA cannot adapt {module_name or 'this module'} of type {type(base_layer).__name__}.")
        self.in_features, self.out_features = in_features, out_features

    def update_layer(self, adapter_name: str, config: BLoRAConfig, inference_mode: bool = False) -> None:
        """Create (or replace) the adapter ``adapter_name`` on this layer."""
        lam, r = config.balance_factor, config.r
        for dim_name, dim in (("in_features", self.in_features), ("out_features", self.out_features)):
            if dim % lam:
                raise ValueError(
                    f"BLoRA cannot adapt module {self.module_name!r}: its {dim_name} ({dim}) is not a multiple of "
                    f"balance_factor={lam} (in_features={self.in_features}, out_features={self.out_features}). "
                    "Choose a balance_factor that divides both, exclude the module, or set skip_indivisible=True."
                )
        self.r[adapter_name] = r
        self.balance_factor[adapter_name] = lam
        self.lora_alpha[adapter_name] = config.lora_alpha
        self.scaling[adapter_name] = config.lora_alpha / r
        self.bal_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.bal_A[adapter_name] = nn.Linear(self.in_features // lam, lam * r, bias=False)
        self.bal_B[adapter_name] = nn.Linear(lam * r, self.out_features // lam, bias=False)
        self.reset_parameters(adapter_name, config.init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def reset_parameters(self, adapter_name: str, init_weights: bool) -> None:
        """LoRA's initialization: Kaiming-uniform A; B zero (``init_weights=True``) or random (``False``)."""
        nn.init.kaiming_uniform_(self.bal_A[adapter_name].weight, a=math.sqrt(5))
        if init_weights:
            nn.init.zeros_(self.bal_B[adapter_name].weight)
        else:
            nn.init.kaiming_uniform_(self.bal_B[adapter_name].weight, a=math.sqrt(5))

    def pooled_output(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """``s · B A pool_λ(dropout(x))``: ``(..., D_in) -> (..., D_out/λ)`` in the adapter's dtype."""
        lam = self.balance_factor[adapter_name]
        lora_a, lora_b = self.bal_A[adapter_name], self.bal_B[adapter_name]
        dropout = self.bal_dropout[adapter_name]
        if isinstance(dropout, nn.Identity):  # pool straight from the input's dtype: no full-width cast copy
            dtype = lora_a.weight.dtype if getattr(self, "cast_input_dtype_enabled", True) else None
            pooled = pool(x, lam, dtype=dtype)
        else:
            pooled = pool(dropout(self._cast_input_dtype(x, lora_a.weight.dtype)), lam)
        return lora_b(lora_a(pooled)) * self.scaling[adapter_name]

    def adapter_output(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """``s · expand_λ(B A pool_λ(dropout(x)))``: ``(..., D_in) -> (..., D_out)`` in the adapter's dtype."""
        return expand(self.pooled_output(adapter_name, x), self.balance_factor[adapter_name])

    def add_adapter_output(self, result: torch.Tensor, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """``result + adapter_output(adapter_name, x)`` without materializing the expanded output (one autograd node
        when there is no dropout)."""
        lam = self.balance_factor[adapter_name]
        if isinstance(self.bal_dropout[adapter_name], nn.Identity) and getattr(self, "cast_input_dtype_enabled", True):
            weights = [self.bal_A[adapter_name].weight, self.bal_B[adapter_name].weight]
            return add_balanced_adapter(result, x, weights, self.scaling[adapter_name], lam, lam)
        return add_expanded(result, self.pooled_output(adapter_name, x), lam)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Full update ``ΔW = s · expand_blocks(B A, λ, λ) / λ`` of shape ``(D_out, D_in)``, in float32."""
        lam = self.balance_factor[adapter_name]
        a = self.bal_A[adapter_name].weight.detach().float()
        b = self.bal_B[adapter_name].weight.detach().float()
        return expand_blocks(b @ a, lam, lam) * (self.scaling[adapter_name] / lam)


class BLoRALinear(AdditiveAdapterForward, nn.Module, BLoRALayer):
    """A linear layer (dense or quantized) with BLoRA adapters: ``y = base(x) + Σ_active s·expand(B A pool(x))``."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: BLoRAConfig, **kwargs: Any) -> None:
        super().__init__()
        BLoRALayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)
        self.register_load_state_dict_pre_hook(check_adapter_shapes_on_load)

    def __repr__(self) -> str:
        return "blora." + super().__repr__()

    def extra_repr(self) -> str:
        return quantization_extra_repr(self)
