"""GradApproxModel: injects GradApprox layers into a model (the tuner peft builds for ``PeftType.GRADAPPROX``)."""

from __future__ import annotations

from typing import Any

from ..merging import DequantizingMergeMixin
from ..tuner import AdapterTuner
from .layer import GradApproxLayer, GradApproxLinear


class GradApproxModel(DequantizingMergeMixin, AdapterTuner):
    """GradApprox adaptation of a model; built by ``peft.get_peft_model`` from a :class:`GradApproxConfig`.

    Supports ``nn.Linear`` bases in any float dtype, bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` bases and
    ``TileInt4Linear`` bases (forward and training; merge with ``merge_and_unload(dequantize=True)``). Call
    :func:`peft_balanced.init_gradapprox` (or use :class:`peft_balanced.GradApproxInitCallback`) to initialise the
    adapters from the gradient.
    """

    prefix: str = "gax_"
    tuner_layer_cls = GradApproxLayer
    layer_cls = GradApproxLinear
    method_name = "GradApprox"

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        """Not implemented for GradApprox (peft's version is LoRA's and would fail deep inside the model)."""
        raise NotImplementedError(
            "add_weighted_adapter is not supported for GradApprox adapters (only BLoRA implements it, with "
            "combination_type='cat'); activate several adapters together with set_adapter([...]) instead."
        )
