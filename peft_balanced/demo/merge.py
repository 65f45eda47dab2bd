"""Merging for the demo and the benchmarks: any peft adapter on an NF4 (or plain) base into a dense model.

:func:`merge_to_dense` is what ``peft-balanced demo`` saves as its merged model; :func:`merge_into_dequantized` is its
path for adapters whose ``merge_and_unload`` has no ``dequantize`` option (plain peft LoRA, which would re-quantize a
4-bit base). The library's own merging is ``merge_and_unload(dequantize=True)`` (:mod:`peft_balanced.tuners.merging`).
"""

from __future__ import annotations

import inspect

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..tuners.merging import dequantized_linear
from ..utils import LLAMA_PROJECTIONS, set_submodule

__all__ = ["merge_into_dequantized", "merge_to_dense"]


def merge_into_dequantized(peft_model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Merge the active adapters of any peft model (ours, or peft's LoRA on a 4-bit base) into plain ``nn.Linear``
    layers holding ``dequantize(W_base) + Σ_active ΔW`` in ``dtype``; returns the base model.

    For tuners whose ``merge_and_unload`` has no ``dequantize`` option and would re-quantize a 4-bit base. Every
    tuner layer must have ``get_delta_weight``; the adapters it holds are the keys of its first
    ``adapter_layer_names`` container.
    """
    model = peft_model.get_base_model()
    for name, module in list(model.named_modules()):
        if not isinstance(module, BaseTunerLayer):
            continue
        linear = dequantized_linear(module.get_base_layer(), dtype).to(dtype)
        held = getattr(module, module.adapter_layer_names[0])
        delta = sum(module.get_delta_weight(a).to(dtype) for a in module.active_adapters if a in held)
        linear.weight.data = linear.weight.data.to(dtype) + delta
        set_submodule(model, name, linear)
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model


def merge_to_dense(peft_model, dtype=None):
    """Merge the adapter into a dense model with plain ``nn.Linear`` layers (``merge_and_unload(dequantize=True)``).

    Adapters whose ``merge_and_unload`` has no ``dequantize`` option (plain PEFT LoRA, which would re-quantize)
    go through :func:`merge_into_dequantized` (exact dequantize-then-add). The result is cast to ``dtype`` when
    given. Raises ``RuntimeError`` if a quantized or adapter layer is left, or a Llama projection is not a plain
    ``nn.Linear``.
    """
    if "dequantize" in inspect.signature(peft_model.merge_and_unload).parameters:
        merged = peft_model.merge_and_unload(dequantize=True)
    else:
        merged = merge_into_dequantized(peft_model)
    leftovers = [n for n, m in merged.named_modules() if "4bit" in type(m).__name__ or hasattr(m, "base_layer")]
    if leftovers:
        raise RuntimeError(f"merged model still has quantized/adapter layers: {leftovers[:3]}")
    if getattr(merged, "is_loaded_in_4bit", False):
        merged.is_loaded_in_4bit = False
    if dtype is not None:
        merged = merged.to(dtype)
    not_dense = [
        f"{n} ({type(m).__name__})"
        for n, m in merged.named_modules()
        if n.rsplit(".", 1)[-1] in LLAMA_PROJECTIONS and type(m) is not nn.Linear
    ]
    if not_dense:
        more = f" and {len(not_dense) - 3} more" if len(not_dense) > 3 else ""
        raise RuntimeError(
            f"merge_to_dense: expected a plain torch.nn.Linear at every projection ({', '.join(LLAMA_PROJECTIONS)}) "
            f"of the merged model; got {', '.join(not_dense[:3])}{more}"
        )
    return merged
