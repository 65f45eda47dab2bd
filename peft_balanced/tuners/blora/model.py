"""BLoRAModel: injects BLoRA layers into a model (the tuner peft builds for ``PeftType.BLORA``)."""

from __future__ import annotations

import warnings
from typing import Any

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, get_quantization_kwargs
from torch import nn

from ..common import AdapterNamesRoutingMixin, DequantizingMergeMixin, is_linear_base
from .config import BLoRAConfig
from .layer import BLoRALayer, BLoRALinear
from .weighted import add_weighted_blora_adapter, check_weighted_adapters


class BLoRAModel(AdapterNamesRoutingMixin, DequantizingMergeMixin, BaseTuner):
    """Balanced low-rank adaptation of a model; built by ``peft.get_peft_model`` from a :class:`BLoRAConfig`.

    Supports ``nn.Linear`` bases in any float dtype and bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` bases
    (Q-BLoRA). ``merge_and_unload(dequantize=True)`` turns a 4-bit base into a 16-bit model with the adapters
    merged exactly.
    """

    prefix: str = "bal_"
    tuner_layer_cls = BLoRALayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        """peft's injection, then an error if ``skip_indivisible`` left no module adapted (0 trainable parameters)."""
        self._skipped_indivisible: list[str] = []
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        adapted = any(isinstance(m, BLoRALayer) and adapter_name in m.bal_A for m in model.modules())
        if self._skipped_indivisible and not adapted:
            lam = self.peft_config[adapter_name].balance_factor
            raise ValueError(
                f"BLoRA adapted no module: skip_indivisible=True skipped every target, since balance_factor={lam} "
                f"divides the in- and out-features of none of them: {', '.join(self._skipped_indivisible)}. "
                "Choose a balance_factor that divides these sizes, or other target_modules."
            )

    def add_weighted_adapter(
        self, adapters: list[str], weights: list[float], adapter_name: str, combination_type: str = "cat"
    ) -> None:
        """Add a frozen adapter ``adapter_name`` whose update is ``Σ_i weights[i] · ΔW(adapters[i])``, exactly.

        Only ``combination_type="cat"`` exists: the adapters (one ``balance_factor``) are concatenated into one of
        rank ``Σ r_i``; see :mod:`peft_balanced.tuners.blora.weighted`. Other types raise ``NotImplementedError``.
        """
        check_weighted_adapters(self, adapters, weights, adapter_name, combination_type)
        add_weighted_blora_adapter(self, list(adapters), list(weights), adapter_name)

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
        if not is_linear_base(base):
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
            self.__dict__.setdefault("_skipped_indivisible", []).append(
                f"{current_key} ({base.in_features} -> {base.out_features})"
            )
            return
        kwargs = get_quantization_kwargs(self.model)
        new_module = BLoRALinear(target, adapter_name, config, module_name=current_key, **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)
