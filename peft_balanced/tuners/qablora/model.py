"""QABLoRAModel: injects QA-BLoRA layers into a tile-INT4 model (the tuner peft builds for ``PeftType.QABLORA``)."""

from __future__ import annotations

import copy
from typing import Any

from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from peft.utils.constants import INCLUDE_LINEAR_LAYERS_SHORTHAND
from torch import nn

from ...quant.linear import TileInt4Linear
from ..tuner import AdapterTuner
from .config import QABLoRAConfig
from .layer import QABLoRALayer, QABLoRALinear, check_qablora_base, quantize_hint


def _under_tuner_layer(key: str, tuner_keys: list[str]) -> bool:
    return any(key.startswith(prefix + ".") for prefix in tuner_keys)


def tile_linear_names(model: nn.Module) -> set[str]:
    """Names of the modules "all-linear" means for QA-BLoRA: every ``TileInt4Linear`` (bare or already wrapped by a
    tuner layer), except a transformers model's output layer."""
    tuner_keys = [k for k, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    names = set()
    for key, module in model.named_modules():
        if _under_tuner_layer(key, tuner_keys):
            continue
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        if isinstance(base, TileInt4Linear):
            names.add(key)
    get_output_embeddings = getattr(model, "get_output_embeddings", None)
    output = get_output_embeddings() if callable(get_output_embeddings) else None
    if output is not None:
        names -= {key for key, module in model.named_modules() if module is output}
    return names


class QABLoRAModel(AdapterTuner):
    """Quantization-aware balanced adaptation of a tile-INT4 model; built by ``peft.get_peft_model`` from a
    :class:`QABLoRAConfig`.

    Every target must be a ``TileInt4Linear`` with the config's tile (see ``peft_balanced.quant``); anything else
    is rejected before the model is changed. ``merge_and_unload()`` shifts the zero points and returns a model whose
    targets are still ``TileInt4Linear`` (4-bit), which ``save_pretrained`` / ``from_pretrained`` round-trip.
    """

    prefix: str = "qab_"
    tuner_layer_cls = QABLoRALayer
    layer_cls = QABLoRALinear
    method_name = "QA-BLoRA"

    def _prepare_model(self, peft_config: QABLoRAConfig, model: nn.Module) -> None:
        """Resolve ``"all-linear"`` to the ``TileInt4Linear`` modules, then check every target before any change."""
        target_modules = peft_config.target_modules
        if isinstance(target_modules, str) and target_modules.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND:
            names = tile_linear_names(model)
            if not names:
                raise ValueError(
                    "QA-BLoRA target_modules='all-linear' found no TileInt4Linear layer: QA-BLoRA adapts only 4-bit "
                    f"tile-INT4 layers. First {quantize_hint(peft_config.tile)}."
                )
            if peft_config.layers_to_transform is not None:
                # peft skips the layer filter for exact names (LoRA's "all-linear" ignores layers_to_transform);
                # apply it here by matching every name through its last component.
                probe = copy.copy(peft_config)
                kept = set()
                for name in names:
                    probe.target_modules = {name.rpartition(".")[2]}
                    if check_target_module_exists(probe, name):
                        kept.add(name)
                names = kept
            peft_config.target_modules = names
        tuner_keys = [k for k, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
        for key, module in model.named_modules():
            if (
                not key
                or _under_tuner_layer(key, tuner_keys)
                or not self._check_target_module_exists(peft_config, key)
            ):
                continue
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            check_qablora_base(base, peft_config.tile, key)

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        """Not implemented for QA-BLoRA (peft's version is LoRA's and would fail deep inside the model)."""
        raise NotImplementedError(
            "add_weighted_adapter is not supported for QA-BLoRA adapters (only BLoRA implements it, with "
            "combination_type='cat'); merge the adapters one after another instead (each merge only shifts the zero points)."
        )

    def _accepts_base(self, config: QABLoRAConfig, base: nn.Module, key: str) -> bool:
        check_qablora_base(base, config.tile, key)
        return True
