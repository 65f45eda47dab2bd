"""Helpers shared by the tuners: quantized-base handling and checkpoint validation."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import resolve_quantization_backend
from torch import nn


def undo_bnb_cpu_repack(module: nn.Module) -> None:
    """Restore the standard layout of a bitsandbytes 4-bit weight that a CPU forward repacked in place.

    On CPUs with AVX512-BF16, bitsandbytes repacks a ``Linear4bit`` weight into a CPU-specific layout during an
    eval-mode forward. Dequantizing that weight with the generic path gives silently wrong values, so every merge
    calls this first. Layers that are not repacked are left untouched.
    """
    weight = getattr(module, "weight", None)
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is None or not getattr(quant_state, "packing_format_for_cpu", False):
        return
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, quant_state)


def guard_bnb_cpu_repack(module: nn.Module) -> None:
    """Stop bitsandbytes from repacking ``module``'s 4-bit weight on CPU, and undo a repack already done.

    A repacked weight takes an inference-only kernel: a later training forward would get no input gradient and a
    merge would dequantize garbage. Adapters wrap 4-bit layers to train them, so they switch the repack off.
    """
    if hasattr(module, "support_avx512bf16_for_cpu"):
        module.support_avx512bf16_for_cpu = False
    undo_bnb_cpu_repack(module)


def dequantized_linear(module: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Return a plain ``nn.Linear`` with the dequantized weight of a quantized linear ``module``.

    ``dtype=None`` keeps the dtype the weight had before quantization. Non-quantized modules are returned as is.
    """
    backend = resolve_quantization_backend(module)
    if backend is None:
        return module
    if not backend.supports_merge:
        raise TypeError(f"{backend.backend_name} layers cannot be dequantized.")
    undo_bnb_cpu_repack(module)
    weight = backend.get_base_weight(module)
    dtype = dtype or weight.dtype
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.to(dtype).contiguous(), requires_grad=False)
    if module.bias is not None:
        linear.bias = nn.Parameter(module.bias.detach().to(dtype).clone(), requires_grad=False)
    return linear


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None, skip: Iterable[nn.Module] = ()) -> nn.Module:
    """Replace every quantized linear of ``model`` (outside tuner layers) by its dequantized ``nn.Linear``.

    Also clears transformers' quantization markers so that ``save_pretrained`` writes a plain model.
    """
    skip_ids = {id(m) for m in skip}
    for name, module in list(model.named_modules()):
        if id(module) in skip_ids or isinstance(module, BaseTunerLayer) or not name:
            continue
        if resolve_quantization_backend(module) is None:
            continue
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if isinstance(parent, BaseTunerLayer):
            continue
        setattr(parent, child_name, dequantized_linear(module, dtype))
    clear_quantization_markers(model)
    return model


def clear_quantization_markers(model: nn.Module) -> None:
    """Remove transformers' record that ``model`` is quantized (quantizer, config entry, flags)."""
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            delattr(model, attr)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    for flag in ("is_quantized", "is_loaded_in_4bit", "is_loaded_in_8bit"):
        if hasattr(model, flag):
            setattr(model, flag, False)


def check_adapter_shapes_on_load(
    module: nn.Module, state_dict: dict, prefix: str, *args: object, **kwargs: object
) -> None:
    """``load_state_dict`` pre-hook: reject adapter tensors whose shapes do not fit this layer, with a clear error."""
    adapter_layer_names = getattr(module, "adapter_layer_names", ())
    for param_name, param in module.named_parameters():
        if param_name.split(".", 1)[0] not in adapter_layer_names:
            continue
        key = prefix + param_name
        if key in state_dict and tuple(state_dict[key].shape) != tuple(param.shape):
            raise ValueError(
                f"The adapter checkpoint does not fit module {getattr(module, 'module_name', prefix.rstrip('.'))!r} "
                f"(in_features={module.in_features}, out_features={module.out_features}): {param_name} has shape "
                f"{tuple(state_dict[key].shape)} in the checkpoint but {tuple(param.shape)} here. The adapter was "
                "made for a base model with other layer sizes (or another r / balance_factor / tile); load it onto "
                "the base model it was trained on."
            )
