"""GradApproxModel: injects GradApprox layers into a model (the tuner peft builds for ``PeftType.GRADAPPROX``)."""

from __future__ import annotations

from typing import Any

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, get_quantization_kwargs
from torch import nn

from ..common import AdapterNamesRoutingMixin, DequantizingMergeMixin, is_linear_base
from .config import GradApproxConfig
from .layer import GradApproxLayer, GradApproxLinear


class GradApproxModel(AdapterNamesRoutingMixin, DequantizingMergeMixin, BaseTuner):
    """GradApprox adaptation of a model; built by ``peft.get_peft_model`` from a :class:`GradApproxConfig`.

    Supports ``nn.Linear`` bases in any float dtype, bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` bases and
    ``TileInt4Linear`` bases (forward and training; merge with ``merge_and_unload(dequantize=True)``). Call
    :func:`peft_balanced.init_gradapprox` (or use :class:`peft_balanced.GradApproxInitCallback`) to initialise the
    adapters from the gradient.
    """

    prefix: str = "gax_"
    tuner_layer_cls = GradApproxLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        """Not implemented for GradApprox (peft's version is LoRA's and would fail deep inside the model)."""
        raise NotImplementedError(
            "add_weighted_adapter is not supported for GradApprox adapters (only BLoRA implements it, with "
            "combination_type='cat'); activate several adapters together with set_adapter([...]) instead."
        )

    def _create_and_replace(
        self,
        config: GradApproxConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        if isinstance(target, GradApproxLayer):
            target.update_layer(adapter_name, config)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not is_linear_base(base, allow_tile_int4=True):
            raise TypeError(
                f"GradApprox cannot adapt module {current_key!r} of type {type(base).__name__}: only torch.nn.Linear, "
                "bitsandbytes 4/8-bit and TileInt4Linear layers are supported. Remove it from target_modules."
            )
        kwargs = get_quantization_kwargs(self.model)
        new_module = GradApproxLinear(target, adapter_name, config, module_name=current_key, **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)
