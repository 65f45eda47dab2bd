"""BLoRAModel: injects BLoRA layers into a model (the tuner peft builds for ``PeftType.BLORA``)."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, get_quantization_kwargs
from peft.utils.quantization_utils import resolve_quantization_backend
from torch import nn

from ..common import dequantize_model, dequantized_linear
from .config import BLoRAConfig
from .layer import BLoRALayer, BLoRALinear


def _inject_adapter_names(module: nn.Module, args: tuple, kwargs: dict, adapter_names: list[str]):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


class BLoRAModel(BaseTuner):
    """Balanced low-rank adaptation of a model; built by ``peft.get_peft_model`` from a :class:`BLoRAConfig`.

    Supports ``nn.Linear`` bases in any float dtype and bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` bases
    (Q-BLoRA). ``merge_and_unload(dequantize=True)`` turns a 4-bit base into a 16-bit model with the adapters
    merged exactly.
    """

    prefix: str = "bal_"
    tuner_layer_cls = BLoRALayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _create_and_replace(
        self,
        config: BLoRAConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        if isinstance(target, BLoRALayer):
            target.update_layer(adapter_name, config)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        is_linear = isinstance(base, nn.Linear) or (
            (backend := resolve_quantization_backend(base)) is not None and backend.layer_type == "linear"
        )
        if not is_linear:
            raise TypeError(
                f"BLoRA cannot adapt module {current_key!r} of type {type(base).__name__}: only torch.nn.Linear and "
                "quantized linear layers (bitsandbytes 4/8-bit) are supported. Remove it from target_modules."
            )
        lam = config.balance_factor
        if config.skip_indivisible and (base.in_features % lam or base.out_features % lam):
            warnings.warn(
                f"BLoRA skips module {current_key!r}: in_features={base.in_features} / "
                f"out_features={base.out_features} are not both multiples of balance_factor={lam}.",
                stacklevel=2,
            )
            return
        kwargs = get_quantization_kwargs(self.model)
        new_module = BLoRALinear(target, adapter_name, config, module_name=current_key, **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any):
        """Route ``adapter_names=[...]`` (one adapter name per sample) to every BLoRA layer."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("adapter_names=... is for inference; call model.eval() first.")
        known = {name for m in self.modules() if isinstance(m, BLoRALayer) for name in m.bal_A}
        unknown = sorted({n for n in adapter_names if n != "__base__"} - known)
        if unknown:
            raise ValueError(f"Unknown adapter(s) in adapter_names: {unknown}; available: {sorted(known)}.")
        hook = partial(_inject_adapter_names, adapter_names=adapter_names)
        handles = [
            m.register_forward_pre_hook(hook, with_kwargs=True) for m in self.modules() if isinstance(m, BLoRALayer)
        ]
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
            dequantize: On a quantized base, first replace every quantized linear by a ``nn.Linear`` holding its
                dequantized weight, then merge: the result is a 16-bit model whose outputs equal the adapted
                model's (no re-quantization error). With ``False`` a 4-bit base is re-quantized after merging,
                as peft's LoRA does.
            dtype: dtype of the dequantized weights (default: the dtype they had before quantization).
        """
        if dequantize:
            for module in self.model.modules():
                if isinstance(module, BLoRALayer) and module.quantization_backend is not None:
                    module.base_layer = dequantized_linear(module.get_base_layer(), dtype)
                    module.quantization_backend = None
        model = super().merge_and_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)
        if dequantize:
            dequantize_model(model, dtype)
        return model
