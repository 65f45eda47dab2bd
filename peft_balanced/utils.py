"""Small module-surgery helpers shared by the whole package (each written once, here)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["LLAMA_PROJECTIONS", "linear_from_weight", "set_submodule"]

# The linear projections of a Llama decoder layer (attention, then MLP): the default adapter targets.
LLAMA_PROJECTIONS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``name`` below ``root`` (``"model.layers.0.mlp.up_proj"``)."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def linear_from_weight(
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    trainable: bool = False,
) -> nn.Linear:
    """An ``nn.Linear`` holding ``weight: (D_out, D_in)`` and ``bias: (D_out,)`` in ``dtype`` (default: the weight's).

    The weight is used as is when it already has ``dtype`` and is contiguous (no copy); the bias is always copied.
    ``trainable=False`` (the default, for frozen bases) sets ``requires_grad=False`` on both.
    """
    weight = weight.detach().to(dtype or weight.dtype).contiguous()
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=trainable)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().to(device=weight.device, dtype=weight.dtype).clone(), trainable)
    return linear
