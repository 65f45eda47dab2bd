"""The tuner base every method of the package builds on: one ``_create_and_replace`` for all of them."""

from __future__ import annotations

from typing import Any, ClassVar

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, get_quantization_kwargs
from torch import nn

from ..backends import is_linear_base
from .forward import AdapterNamesRoutingMixin

__all__ = ["AdapterTuner"]


class AdapterTuner(AdapterNamesRoutingMixin, BaseTuner):
    """``BaseTuner`` with the package's injection: wrap each target in ``layer_cls``, or add an adapter to a target
    that already is one.

    Subclasses set ``prefix``, ``tuner_layer_cls`` (the ``BaseTunerLayer`` mixin), ``layer_cls`` (the
    ``nn.Module`` class) and ``method_name``, and may override :meth:`_accepts_base` to reject or skip bases.
    """

    layer_cls: ClassVar[type[nn.Module]]
    method_name: ClassVar[str]
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _accepts_base(self, config: Any, base: nn.Module, key: str) -> bool:
        """Raise for a base the method cannot adapt; ``False`` skips it. Default: every linear a backend exists for."""
        if not is_linear_base(base):
            raise TypeError(
                f"{self.method_name} cannot adapt module {key!r} of type {type(base).__name__}: only torch.nn.Linear "
                "and quantized linear layers (bitsandbytes 4/8-bit, TileInt4Linear, and the others peft has a "
                "quantization backend for) are supported. Remove it from target_modules."
            )
        return True

    def _create_and_replace(
        self,
        config: Any,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        if isinstance(target, self.tuner_layer_cls):
            target.update_layer(adapter_name, config)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not self._accepts_base(config, base, current_key):
            return
        kwargs = get_quantization_kwargs(self.model)
        new_module = self.layer_cls(target, adapter_name, config, module_name=current_key, **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        """peft's version, except on unload (``new_module`` is the bare base): put it back as it is. peft would copy
        a ``weight`` over, which a ``TileInt4Linear`` does not have."""
        if isinstance(new_module, BaseTunerLayer):
            super()._replace_module(parent, child_name, new_module, child)
        else:
            setattr(parent, child_name, new_module)
