"""Forward of the tuner layers: base output plus adapter outputs, with disabled / merged adapters and mixed
batches (``model(..., adapter_names=[...])``: sample ``i`` runs adapter ``adapter_names[i]``)."""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from torch import nn

from ..backends import base_forward

__all__ = ["AdapterNamesRoutingMixin", "AdditiveAdapterForward"]


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
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"{self.method_name} module {self.module_name or type(self).__name__!r} takes inputs whose last "
                f"dimension is its in_features={self.in_features}; got an input of shape {tuple(x.shape)}"
            )
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        result = base_forward(self.quantization_backend, self.base_layer, x, *args, **kwargs)
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
