"""BLoRA layers: one class for nn.Linear and every quantized linear a backend exists for (bnb 4/8-bit, tile-INT4)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..balanced import BalancedAdapterLayer
from ..layer import AdapterLinear, dropout_module
from ..merging import DeltaWeightMerge
from .config import BLoRAConfig


class BLoRALayer(DeltaWeightMerge, BalancedAdapterLayer):
    """State shared by BLoRA layers: per adapter ``bal_A: (λr, D_in/λ)``, ``bal_B: (D_out/λ, λr)``."""

    adapter_layer_names: tuple[str, ...] = ("bal_A", "bal_B")
    other_param_names: tuple[str, ...] = ("r", "balance_factor", "lora_alpha", "scaling", "bal_dropout")
    method_name = "BLoRA"

    def _init_adapter_state(self) -> None:
        self.r: dict[str, int] = {}
        self.balance_factor: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.bal_dropout = nn.ModuleDict({})
        self.bal_A = nn.ModuleDict({})
        self.bal_B = nn.ModuleDict({})

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
        self.scaling[adapter_name] = config.scaling
        self.bal_dropout[adapter_name] = dropout_module(config.lora_dropout)
        self.bal_A[adapter_name] = nn.Linear(self.in_features // lam, lam * r, bias=False)
        self.bal_B[adapter_name] = nn.Linear(lam * r, self.out_features // lam, bias=False)
        self._finish_update(adapter_name, config.init_weights, inference_mode)

    def reset_parameters(self, adapter_name: str, init_weights: bool) -> None:
        """LoRA's initialization: Kaiming-uniform A; B zero (``init_weights=True``) or random (``False``)."""
        nn.init.kaiming_uniform_(self.bal_A[adapter_name].weight, a=math.sqrt(5))
        if init_weights:
            nn.init.zeros_(self.bal_B[adapter_name].weight)
        else:
            nn.init.kaiming_uniform_(self.bal_B[adapter_name].weight, a=math.sqrt(5))

    def balanced_weights(self, adapter_name: str) -> list[torch.Tensor]:
        return [self.bal_A[adapter_name].weight, self.bal_B[adapter_name].weight]

    def balanced_factors(self, adapter_name: str) -> tuple[int, int]:
        lam = self.balance_factor[adapter_name]
        return lam, lam

    def balanced_dropout(self, adapter_name: str) -> nn.Module:
        return self.bal_dropout[adapter_name]


class BLoRALinear(AdapterLinear, BLoRALayer):
    """A linear layer (dense or quantized) with BLoRA adapters: ``y = base(x) + Σ_active s·expand(B A pool(x))``."""

    repr_prefix = "blora"
