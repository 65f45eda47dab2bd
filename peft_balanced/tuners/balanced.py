"""The balanced-adapter layer shared by BLoRA and QA-BLoRA: small matrices between a pooling and an expansion.

An adapter is a chain of weights ``W_1 … W_n`` (BLoRA: ``[A, B]``, QA-BLoRA: ``[H]``) and two factors
``(k_in, k_out)`` (BLoRA: ``(λ, λ)``, QA-BLoRA: ``(λ1, λ2)``):

    adapter(x) = s · expand_k_out(W_n … W_1 pool_k_in(dropout(x)))      (..., D_in) -> (..., D_out)
    ΔW         = s · expand_blocks(W_n … W_1, k_out, k_in) / k_in        (D_out, D_in)

The math itself (``pool``, ``expand``, the fused add) lives in ``peft_balanced.ops``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import add_balanced_adapter, add_expanded, expand, expand_blocks, pool
from .layer import AdapterLayer

__all__ = ["BalancedAdapterLayer"]


class BalancedAdapterLayer(AdapterLayer):
    """Pooled output, fused add and delta weight of a balanced adapter, from three per-tuner accessors."""

    def balanced_weights(self, adapter_name: str) -> list[torch.Tensor]:
        """The chain ``[W_1, …, W_n]`` applied to the pooled input, in order."""
        raise NotImplementedError

    def balanced_factors(self, adapter_name: str) -> tuple[int, int]:
        """``(k_in, k_out)``: the pooling factor of the input and the expansion factor of the output."""
        raise NotImplementedError

    def balanced_dropout(self, adapter_name: str) -> nn.Module:
        """The adapter's input dropout (``nn.Identity`` when off)."""
        raise NotImplementedError

    def pooled_output(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """``s · W_n … W_1 pool_k_in(dropout(x))``: ``(..., D_in) -> (..., D_out/k_out)`` in the adapter's dtype."""
        weights = self.balanced_weights(adapter_name)
        k_in, _ = self.balanced_factors(adapter_name)
        dropout = self.balanced_dropout(adapter_name)
        if isinstance(dropout, nn.Identity):  # pool straight from the input's dtype: no full-width cast copy
            dtype = weights[0].dtype if getattr(self, "cast_input_dtype_enabled", True) else None
            hidden = pool(x, k_in, dtype=dtype)
        else:
            hidden = pool(dropout(self._cast_input_dtype(x, weights[0].dtype)), k_in)
        for weight in weights:
            hidden = F.linear(hidden, weight)
        return hidden * self.scaling[adapter_name]

    def adapter_output(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """``s · expand_k_out(W_n … W_1 pool_k_in(dropout(x)))``: ``(..., D_in) -> (..., D_out)``."""
        return expand(self.pooled_output(adapter_name, x), self.balanced_factors(adapter_name)[1])

    def add_adapter_output(self, result: torch.Tensor, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """``result + adapter_output(adapter_name, x)`` without materializing the expanded output (one autograd node
        when there is no dropout)."""
        k_in, k_out = self.balanced_factors(adapter_name)
        if isinstance(self.balanced_dropout(adapter_name), nn.Identity) and getattr(
            self, "cast_input_dtype_enabled", True
        ):
            weights = self.balanced_weights(adapter_name)
            return add_balanced_adapter(result, x, weights, self.scaling[adapter_name], k_in, k_out)
        return add_expanded(result, self.pooled_output(adapter_name, x), k_out)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Full update ``ΔW = s · expand_blocks(W_n … W_1, k_out, k_in) / k_in``: ``(D_out, D_in)``, float32."""
        k_in, k_out = self.balanced_factors(adapter_name)
        weights = [weight.detach().float() for weight in self.balanced_weights(adapter_name)]
        product = weights[0]
        for weight in weights[1:]:
            product = weight @ product
        return expand_blocks(product, k_out, k_in) * (self.scaling[adapter_name] / k_in)
