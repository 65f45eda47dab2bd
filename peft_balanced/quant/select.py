"""Which linears of a model a :class:`TileInt4Spec` quantizes (shared by ``quantize_model`` and the transformers
quantizer)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from .spec import TileInt4Spec
from .tile_int4 import check_tile_shape

__all__ = ["iter_quantizable_linears"]


def _is_plain_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` holding a plain float weight (not bnb/other quantized subclasses, not MHA's out_proj)."""
    if not isinstance(module, nn.Linear) or isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return False
    weight = getattr(module, "weight", None)
    return type(weight) in (nn.Parameter, torch.Tensor) and weight.is_floating_point()


def _matches(name: str, patterns: Iterable[str]) -> bool:
    """``True`` if module ``name`` equals a pattern or ends with ``"." + pattern``."""
    return any(name == p or name.endswith("." + p) for p in patterns)


def iter_quantizable_linears(
    model: nn.Module, spec: TileInt4Spec, also_skip: Iterable[str] = ()
) -> Iterator[tuple[str, nn.Linear]]:
    """Yield ``(name, linear)`` for every ``nn.Linear`` of ``model`` that ``spec`` quantizes.

    Skips modules whose name matches ``spec.skip_modules`` or ``also_skip`` by suffix; a linear whose shape does not
    fit ``spec.tile`` raises a ``ValueError`` naming it, or is skipped when ``spec.skip_indivisible``. The list is
    materialised before yielding so the caller may replace modules while iterating.
    """
    skip = [*spec.skip_modules, *also_skip]
    selected = []
    for name, module in model.named_modules():
        if not _is_plain_linear(module) or _matches(name, skip):
            continue
        try:
            check_tile_shape(module.out_features, module.in_features, spec.tile, name)
        except ValueError as err:
            if spec.skip_indivisible:
                continue
            raise ValueError(f"{err}. Add it to skip_modules or pass skip_indivisible=True.") from None
        selected.append((name, module))
    yield from selected
