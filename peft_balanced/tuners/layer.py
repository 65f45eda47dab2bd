"""What every tuner layer of the package shares: the base-layer state (:class:`AdapterLayer`) and the one
``nn.Module`` construction (:class:`AdapterLinear`).

A tuner defines ``XLayer(AdapterLayer)`` with its per-adapter containers (``_init_adapter_state``), ``update_layer``
and ``reset_parameters``, and ``class XLinear(AdapterLinear, XLayer)``. The base layer's quantization backend
(``peft_balanced.backends.resolve_backend``) decides how it is read, run and merged into, so one class covers
``nn.Linear``, bitsandbytes 4/8-bit, tile-INT4 and every other base peft has a backend for.
"""

from __future__ import annotations

from typing import Any, ClassVar

from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import quantization_extra_repr
from torch import nn

from ..backends import in_out_features, prepare_base, resolve_backend
from .checks import check_adapter_shapes_on_load
from .forward import AdditiveAdapterForward

__all__ = ["AdapterLayer", "AdapterLinear", "dropout_module"]


def dropout_module(p: float) -> nn.Module:
    """``nn.Dropout(p)``, or ``nn.Identity()`` for ``p == 0`` (which lets the balanced layers fuse their add)."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


class AdapterLayer(BaseTunerLayer):
    """The base-layer state of a tuner layer: ``base_layer``, ``module_name``, ``quantization_backend``,
    ``in_features`` / ``out_features`` and the merge bookkeeping."""

    method_name: ClassVar[str] = "This method"  # in error messages: "BLoRA cannot adapt ..."

    def __init__(self, base_layer: nn.Module, module_name: str = "", **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.module_name = module_name
        base = self.get_base_layer()
        self.quantization_backend = resolve_backend(
            base, get_apply_tensor_subclass=kwargs.get("get_apply_tensor_subclass")
        )
        in_features, out_features = in_out_features(self.quantization_backend, base)
        if in_features is None:
            raise TypeError(
                f"{self.method_name} cannot adapt {module_name or 'this module'} of type {type(base).__name__}."
            )
        self.in_features, self.out_features = in_features, out_features
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs
        self._init_adapter_state()
        prepare_base(self.quantization_backend, base)

    def _init_adapter_state(self) -> None:
        """Create the empty per-adapter containers (``nn.ModuleDict``, ``nn.ParameterDict``, dicts)."""
        raise NotImplementedError

    def _finish_update(self, adapter_name: str, init_weights: bool, inference_mode: bool) -> None:
        """The tail of every ``update_layer``: initialise, move next to the base weight, keep the active set."""
        self.reset_parameters(adapter_name, init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)


class AdapterLinear(AdditiveAdapterForward, nn.Module):
    """The ``nn.Module`` half of a tuner's linear layer: ``class BLoRALinear(AdapterLinear, BLoRALayer)``.

    ``y = base(x) + Σ_active adapter(x)``; builds the layer's state, adds the first adapter and checks the shapes of
    adapter tensors loaded later.
    """

    repr_prefix: ClassVar[str] = ""  # "blora" gives "blora.BLoRALinear(...)", as peft's "lora.Linear"

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any, **kwargs: Any) -> None:
        nn.Module.__init__(self)
        AdapterLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)
        self.register_load_state_dict_pre_hook(check_adapter_shapes_on_load)

    def __repr__(self) -> str:
        return f"{self.repr_prefix}." + super().__repr__()

    def extra_repr(self) -> str:
        return quantization_extra_repr(self)
