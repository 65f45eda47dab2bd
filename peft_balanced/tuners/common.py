"""Helpers shared by the tuners: quantized-base handling and checkpoint validation."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterable
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from peft.utils import resolve_quantization_backend
from torch import nn

from ..quant.kernels.nf4 import nf4_linear, uses_fast_nf4
from ..utils import linear_from_weight, set_submodule


def undo_bnb_cpu_repack(module: nn.Module) -> None:
    """Restore the standard layout of a bitsandbytes 4-bit weight that a CPU forward repacked in place.

    On CPUs with AVX512-BF16, bitsandbytes repacks a ``Linear4bit`` weight into a CPU-specific layout during an
    eval-mode forward. Dequantizing that weight with the generic path gives silently wrong values, so every merge
    calls this first. Layers that are not repacked are left untouched.
    """
    weight = getattr(module, "weight", None)
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is None or not getattr(quant_state, "packing_format_for_cpu", False):
        return
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, quant_state)


def guard_bnb_cpu_repack(module: nn.Module) -> None:
    """Stop bitsandbytes from repacking ``module``'s 4-bit weight on CPU, and undo a repack already done.

    A repacked weight takes an inference-only kernel: a later training forward would get no input gradient and a
    merge would dequantize garbage. Adapters wrap 4-bit layers to train them, so they switch the repack off.
    """
    if hasattr(module, "support_avx512bf16_for_cpu"):
        module.support_avx512bf16_for_cpu = False
    undo_bnb_cpu_repack(module)


def dequantized_linear(module: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Return a plain ``nn.Linear`` with the dequantized weight of a quantized linear ``module``.

    ``dtype=None`` keeps the dtype the weight had before quantization. Non-quantized modules are returned as is.
    """
    if is_tile_int4(module):
        weight = module.dequantize(dtype or module.compute_dtype)
        return linear_from_weight(weight, module.bias)
    backend = resolve_quantization_backend(module)
    if backend is None:
        return module
    if not backend.supports_merge:
        raise TypeError(f"{backend.backend_name} layers cannot be dequantized.")
    undo_bnb_cpu_repack(module)
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
        if resolve_quantization_backend(module) is None and not is_tile_int4(module):
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


def check_adapter_shapes_on_load(
    module: nn.Module, state_dict: dict, prefix: str, *args: object, **kwargs: object
) -> None:
    """``load_state_dict`` pre-hook: reject adapter tensors whose shapes do not fit this layer, with a clear error."""
    adapter_layer_names = getattr(module, "adapter_layer_names", ())
    for param_name, param in module.named_parameters():
        if param_name.split(".", 1)[0] not in adapter_layer_names:
            continue
        key = prefix + param_name
        if key in state_dict and tuple(state_dict[key].shape) != tuple(param.shape):
            raise ValueError(
                f"The adapter checkpoint does not fit module {getattr(module, 'module_name', prefix.rstrip('.'))!r} "
                f"(in_features={module.in_features}, out_features={module.out_features}): {param_name} has shape "
                f"{tuple(state_dict[key].shape)} in the checkpoint but {tuple(param.shape)} here. The adapter was "
                "made for a base model with other layer sizes (or another r / balance_factor / tile); load it onto "
                "the base model it was trained on."
            )


def is_tile_int4(module: nn.Module) -> bool:
    """``True`` for a :class:`peft_balanced.quant.TileInt4Linear` (without importing the quant package)."""
    quant_linear = sys.modules.get("peft_balanced.quant.linear")
    return quant_linear is not None and isinstance(module, quant_linear.TileInt4Linear)


def _inject_adapter_names(module: nn.Module, args: tuple, kwargs: dict, adapter_names: list[str]):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


class AdapterNamesRoutingMixin:
    """``BaseTuner`` mixin: ``model(..., adapter_names=[...])`` runs sample ``i`` with adapter ``adapter_names[i]``.

    The tuner's layers receive the list through a forward pre-hook and implement ``_mixed_batch_forward``; the
    adapter names a layer holds are the keys of its first ``adapter_layer_names`` entry.
    """

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any):
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("adapter_names=... is for inference; call model.eval() first.")
        layers = [m for m in self.modules() if isinstance(m, self.tuner_layer_cls)]
        if any(layer.merged for layer in layers):
            raise ValueError("Cannot pass adapter_names while adapters are merged; call unmerge_adapter() first.")
        known = {name for layer in layers for name in getattr(layer, layer.adapter_layer_names[0])}
        unknown = sorted({n for n in adapter_names if n != "__base__"} - known)
        if unknown:
            raise ValueError(f"Unknown adapter(s) in adapter_names: {unknown}; available: {sorted(known)}.")
        hook = partial(_inject_adapter_names, adapter_names=adapter_names)
        handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


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


class AdditiveAdapterForward:
    """Forward of a tuner layer whose adapters add ``adapter_output(name, x)`` to the base layer's output.

    The layer implements ``adapter_output(name, x)`` (used for mixed batches) and ``add_adapter_output(result, name,
    x)`` (``result + adapter_output``, which a layer may fuse). Put it before ``nn.Module`` in the bases. Handles disabled and merged adapters and mixed batches
    (``adapter_names[i]`` for sample ``i``; ``"__base__"``: no adapter).
    """

    def _holds_adapter(self, name: str) -> bool:
        return name in getattr(self, self.adapter_layer_names[0])

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        if not args and not kwargs and uses_fast_nf4(self.base_layer, x):
            result = nf4_linear(self.base_layer, x)  # a fresh output: no defensive clone needed
        else:
            result = self.base_layer(x, *args, **kwargs)
            backend = getattr(self, "quantization_backend", None)
            if backend is not None:
                result = backend.maybe_clone_base_result(result)
        for name in self.active_adapters:
            if self._holds_adapter(name):
                result = self.add_adapter_output(result, name, x)
        return result

    def _mixed_batch_forward(
        self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any
    ) -> torch.Tensor:
        if len(adapter_names) != len(x):
            raise ValueError(f"adapter_names has {len(adapter_names)} entries for a batch of {len(x)} inputs.")
        result = self.base_layer(x, *args, **kwargs).clone()
        for name in set(adapter_names):
            if name == "__base__" or not self._holds_adapter(name):
                continue
            rows = [i for i, n in enumerate(adapter_names) if n == name]
            result[rows] += self.adapter_output(name, x[rows]).to(result.dtype)
        return result


class DeltaWeightMerge:
    """merge / unmerge for tuner layers whose update is ``get_delta_weight(name)``: ``(D_out, D_in)`` float32.

    The delta is added to the (dequantized) base weight, which a quantized base re-quantizes, as peft's LoRA does;
    ``merge_and_unload(dequantize=True)`` gives a lossless 16/32-bit result instead.
    """

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the active (or the given) adapters' ``ΔW`` to the base weight."""
        for name in check_adapters_to_merge(self, adapter_names):
            if self._holds_adapter(name):
                self._add_to_base_weight(name, sign=1.0, check_finite=safe_merge)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract every merged adapter's ``ΔW`` again, newest first."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if self._holds_adapter(name):
                self._add_to_base_weight(name, sign=-1.0, check_finite=False)

    def _add_to_base_weight(self, adapter_name: str, sign: float, check_finite: bool) -> None:
        backend = self.quantization_backend
        if backend is not None and not backend.supports_merge:
            raise TypeError(
                f"Cannot merge into module {self.module_name!r} in place: {backend.backend_name} layers cannot be "
                "updated. Use merge_and_unload(dequantize=True)."
            )
        undo_bnb_cpu_repack(self.get_base_layer())
        weight = self.get_base_weight()
        merged = weight.float() + sign * self.get_delta_weight(adapter_name).to(weight.device)
        if check_finite and not torch.isfinite(merged).all():
            raise ValueError(
                f"NaNs or infs in the merged weight of module {self.module_name!r}; adapter {adapter_name!r} is broken."
            )
        self.set_base_weight(merged.to(weight.dtype))


def is_linear_base(module: nn.Module, allow_tile_int4: bool = False) -> bool:
    """``True`` for ``nn.Linear``, a quantized linear peft has a backend for (bnb 4/8-bit, ...), and optionally a
    ``TileInt4Linear``: the bases a tuner's one linear layer class can wrap."""
    if isinstance(module, nn.Linear) or (allow_tile_int4 and is_tile_int4(module)):
        return True
    backend = resolve_quantization_backend(module)
    return backend is not None and backend.layer_type == "linear"
