"""Merging adapters into their bases: in place through the backend, or into dequantized 16/32-bit weights."""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ..backends import merge_delta, resolve_backend
from ..utils import linear_from_weight, set_submodule

__all__ = [
    "DeltaWeightMerge",
    "DequantizingMergeMixin",
    "clear_quantization_markers",
    "dequantize_model",
    "dequantized_linear",
]


def dequantized_linear(module: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Return a plain ``nn.Linear`` with the dequantized weight of a quantized linear ``module``.

    ``dtype=None`` keeps the dtype the weight had before quantization. Non-quantized modules are returned as is.
    """
    backend = resolve_backend(module)
    if backend is None:
        return module
    if not backend.supports_merge:
        raise TypeError(f"{backend.backend_name} layers cannot be dequantized.")
    weight = backend.get_base_weight(module)
    return linear_from_weight(weight.to(dtype or weight.dtype), module.bias)


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None, skip: Iterable[nn.Module] = ()) -> nn.Module:
    """Replace every quantized linear of ``model`` (outside tuner layers) by its dequantized ``nn.Linear``.

    Also clears transformers' quantization markers so that ``save_pretrained`` writes a plain model.
    """
    skip_ids = {id(m) for m in skip}
    for name, module in list(model.named_modules()):
        if id(module) in skip_ids or isinstance(module, BaseTunerLayer) or not name:
            continue
        if resolve_backend(module) is None:
            continue
        if isinstance(model.get_submodule(name.rpartition(".")[0]), BaseTunerLayer):
            continue
        set_submodule(model, name, dequantized_linear(module, dtype))
    clear_quantization_markers(model)
    return model


def clear_quantization_markers(model: nn.Module) -> None:
    """Remove transformers' record that ``model`` is quantized (quantizer, config entry, flags)."""
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            delattr(model, attr)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    for flag in ("is_quantized", "is_loaded_in_4bit", "is_loaded_in_8bit"):
        if hasattr(model, flag):
            setattr(model, flag, False)


class DequantizingMergeMixin:
    """``BaseTuner`` mixin: ``merge_and_unload(dequantize=True)`` merges into dequantized 16/32-bit weights."""

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
            dequantize: On a quantized base (bitsandbytes 4/8-bit, TileInt4), first replace every quantized linear
                by a ``nn.Linear`` holding its dequantized weight, then merge: the result is a 16/32-bit model whose
                outputs equal the adapted model's (no re-quantization error). With ``False`` a bitsandbytes base is
                re-quantized after merging, as peft's LoRA does.
            dtype: dtype of the dequantized weights (default: the dtype they had before quantization).

        Raises ``ValueError`` on a model whose adapters were already merged and unloaded (a second call would merge
        nothing and return the first call's, possibly re-quantized, weights), and for ``dequantize=True`` on
        adapters already merged into quantized weights (``merge_adapter()``), which would keep the re-quantization
        error.
        """
        layers = [m for m in self.model.modules() if isinstance(m, self.tuner_layer_cls)]
        if not layers:
            raise ValueError(
                f"merge_and_unload: the model holds no {self.tuner_layer_cls.__name__} any more: its adapters were "
                "already merged and unloaded (or unloaded). merge_and_unload() returns the merged model; a second "
                "call would merge nothing and, with dequantize=True, only dequantize the re-quantized weights. Call "
                "it once, with dequantize=True for a lossless 16-bit model or without for a re-quantized one."
            )
        merged_quantized = [m.module_name for m in layers if m.merged and m.quantization_backend is not None]
        if dequantize and merged_quantized:
            raise ValueError(
                f"merge_and_unload(dequantize=True): the adapters are already merged into the quantized weights of "
                f"{len(merged_quantized)} module(s), e.g. {merged_quantized[0]!r} (merge_adapter() re-quantized "
                "them), so the result would keep the re-quantization error. Load the base model and the adapter "
                "again and call merge_and_unload(dequantize=True) without merging first."
            )
        if dequantize:
            for module in self.model.modules():
                if isinstance(module, self.tuner_layer_cls) and module.quantization_backend is not None:
                    module.base_layer = dequantized_linear(module.get_base_layer(), dtype)
                    module.quantization_backend = None
        model = super().merge_and_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)
        if dequantize:
            dequantize_model(model, dtype)
        return model


class DeltaWeightMerge:
    """merge / unmerge for tuner layers whose update is ``get_delta_weight(name)``: ``(D_out, D_in)`` float32.

    The delta goes to the base through its quantization backend (``peft_balanced.backends.merge_delta``): added to
    the (dequantized) weight, which a quantized base re-quantizes, as peft's LoRA does, or to the zero points of a
    tile-INT4 base; ``merge_and_unload(dequantize=True)`` gives a lossless 16/32-bit result instead.
    """

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the active (or the given) adapters' ``ΔW`` to the base weight."""
        for name in check_adapters_to_merge(self, adapter_names):
            if self._holds_adapter(name):
                merge_delta(self, name, self.get_delta_weight(name), check_finite=safe_merge)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract every merged adapter's ``ΔW`` again, newest first."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if self._holds_adapter(name):
                merge_delta(self, name, -self.get_delta_weight(name), check_finite=False)
