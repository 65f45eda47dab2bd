"""Load-time checks of adapter tensors against the layers they are loaded into."""

from __future__ import annotations

from torch import nn

__all__ = ["check_adapter_shapes_on_load"]


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
