"""BLoRAModel: injects BLoRA layers into a model (the tuner peft builds for ``PeftType.BLORA``)."""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from ..merging import DequantizingMergeMixin
from ..tuner import AdapterTuner
from .config import BLoRAConfig
from .layer import BLoRALayer, BLoRALinear
from .weighted import add_weighted_blora_adapter, check_weighted_adapters


class BLoRAModel(DequantizingMergeMixin, AdapterTuner):
    """Balanced low-rank adaptation of a model; built by ``peft.get_peft_model`` from a :class:`BLoRAConfig`.

    Supports ``nn.Linear`` bases in any float dtype, bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` bases (Q-BLoRA)
    and ``TileInt4Linear`` bases. ``merge_and_unload(dequantize=True)`` turns a 4-bit base into a 16-bit model with
    the adapters merged exactly; a tile-INT4 base also merges in place, staying 4-bit, when ``balance_factor`` is a
    multiple of both tile sides.
    """

    prefix: str = "bal_"
    tuner_layer_cls = BLoRALayer
    layer_cls = BLoRALinear
    method_name = "BLoRA"

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

    def _accepts_base(self, config: BLoRAConfig, base: nn.Module, key: str) -> bool:
        super()._accepts_base(config, base, key)
        lam = config.balance_factor
        if config.skip_indivisible and (base.in_features % lam or base.out_features % lam):
            warnings.warn(
                f"BLoRA skips module {key!r}: in_features={base.in_features} / "
                f"out_features={base.out_features} are not both multiples of balance_factor={lam}.",
                stacklevel=3,
            )
            self.__dict__.setdefault("_skipped_indivisible", []).append(
                f"{key} ({base.in_features} -> {base.out_features})"
            )
            return False
        return True
