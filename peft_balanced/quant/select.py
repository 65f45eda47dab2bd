"""Which linears of a model a :class:`TileInt4Spec` quantizes (shared by ``quantize_model`` and the transformers
quantizer)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from .spec import TileInt4Spec
from .tile_int4 import check_tile_shape

__all__ = ["check_skip_modules_match", "iter_quantizable_linears"]


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


def check_skip_modules_match(model: nn.Module, skip_modules: Iterable[str], default: Iterable[str] = ()) -> None:
    """Raise a ``ValueError`` for an entry of ``skip_modules`` that matches no linear of ``model`` (a typo would
    otherwise quantize the module the user meant to keep). Entries of ``default`` (e.g. ``"lm_head"``, which not
    every model has) are exempt."""
    linear_names = [name for name, module in model.named_modules() if _is_plain_linear(module)]
    unmatched = [p for p in skip_modules if p not in tuple(default) and not _matches_any(linear_names, p)]
    if unmatched:
        suffixes = sorted({name.rpartition(".")[2] for name in linear_names})
        raise ValueError(
            f"skip_modules entries {unmatched} match no linear of {type(model).__name__}; an entry names a linear "
            f"by its full name or a dotted suffix of it, e.g. {suffixes[:8]}"
        )


def _matches_any(names: Iterable[str], pattern: str) -> bool:
    return any(_matches(name, [pattern]) for name in names)
