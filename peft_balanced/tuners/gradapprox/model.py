"""GradApproxModel: injects GradApprox layers into a model (the tuner peft builds for ``PeftType.GRADAPPROX``)."""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, get_quantization_kwargs
from peft.utils.quantization_utils import resolve_quantization_backend
from torch import nn

from ..common import dequantize_model, dequantized_linear
from .config import GradApproxConfig
from .layer import GradApproxLayer, GradApproxLinear, is_tile_int4


def _inject_adapter_names(module: nn.Module, args: tuple, kwargs: dict, adapter_names: list[str]):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


def dequantized_tile_int4(module: nn.Module, dtype: torch.dtype | None = None) -> nn.Linear:
    """A plain ``nn.Linear`` holding the dequantized weight (and bias) of a ``TileInt4Linear``."""
    weight = module.dequantize(dtype or module.compute_dtype)
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    if module.bias is not None:
        linear.bias = nn.Parameter(module.bias.detach().to(weight.dtype).clone(), requires_grad=False)
    return linear


def _dequantize_tile_int4_modules(model: nn.Module, dtype: torch.dtype | None) -> None:
    """Replace every ``TileInt4Linear`` of ``model`` outside tuner layers by its dequantized ``nn.Linear``."""
    for name, module in list(model.named_modules()):
        if not name or not is_tile_int4(module):
            continue
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if not isinstance(parent, BaseTunerLayer):
            setattr(parent, child_name, dequantized_tile_int4(module, dtype))


class GradApproxModel(BaseTuner):
    """GradApprox adaptation of a model; built by ``peft.get_peft_model`` from a :class:`GradApproxConfig`.

    Supports ``nn.Linear`` bases in any float dtype, bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` bases and
    ``TileInt4Linear`` bases (forward and training; merge with ``merge_and_unload(dequantize=True)``). Call
    :func:`peft_balanced.init_gradapprox` (or use :class:`peft_balanced.GradApproxInitCallback`) to initialise the
    adapters from the gradient.
    """

    prefix: str = "gax_"
    tuner_layer_cls = GradApproxLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

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
        is_linear = (
            isinstance(base, nn.Linear)
            or is_tile_int4(base)
            or ((backend := resolve_quantization_backend(base)) is not None and backend.layer_type == "linear")
        )
        if not is_linear:
            raise TypeError(
                f"GradApprox cannot adapt module {current_key!r} of type {type(base).__name__}: only torch.nn.Linear, "
                "bitsandbytes 4/8-bit and TileInt4Linear layers are supported. Remove it from target_modules."
            )
        kwargs = get_quantization_kwargs(self.model)
        new_module = GradApproxLinear(target, adapter_name, config, module_name=current_key, **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any):
        """Route ``adapter_names=[...]`` (one adapter name per sample) to every GradApprox layer."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("adapter_names=... is for inference; call model.eval() first.")
        layers = [m for m in self.modules() if isinstance(m, GradApproxLayer)]
        known = {name for layer in layers for name in layer.gax_A}
        unknown = sorted({n for n in adapter_names if n != "__base__"} - known)
        if unknown:
            raise ValueError(f"Unknown adapter(s) in adapter_names: {unknown}; available: {sorted(known)}.")
        if any(layer.merged for layer in layers):
            raise ValueError("Cannot pass adapter_names while adapters are merged; call unmerge_adapter() first.")
        hook = partial(_inject_adapter_names, adapter_names=adapter_names)
        handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def merge_and_unload(
        self,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
        dequantize: bool = False,
        dtype: torch.dtype | None = None,
    ) -> nn.Module:
        """Merge the adapters into the base weights and return the plain base model.

        Args:
            dequantize: On a quantized base (bitsandbytes, TileInt4), first replace every quantized linear by a
                ``nn.Linear`` holding its dequantized weight, then merge: the result is a 16/32-bit model whose outputs
                equal the adapted model's. With ``False`` a bitsandbytes base is re-quantized after merging (as peft's
                LoRA does) and a TileInt4 base raises an error.
            dtype: dtype of the dequantized weights (default: the dtype they had before quantization).
        """
        if dequantize:
            for module in self.model.modules():
                if isinstance(module, GradApproxLayer) and module.quantization_backend is not None:
                    base = module.get_base_layer()
                    tile = is_tile_int4(base)
                    module.base_layer = dequantized_tile_int4(base, dtype) if tile else dequantized_linear(base, dtype)
                    module.quantization_backend = None
        model = super().merge_and_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)
        if dequantize:
            _dequantize_tile_int4_modules(model, dtype)
            dequantize_model(model, dtype)
        return model
