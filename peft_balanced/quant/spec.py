"""``TileInt4Spec``: the one description of a tile-INT4 quantization, passed to every layer of the package.

It carries the format (``tile``, ``scale_dtype``, ``zero_dtype``) and which linears of a model get it
(``skip_modules``, ``skip_indivisible``). ``TileInt4Linear``, ``quantize_model``, the transformers config
``TileInt4Config`` and its quantizer all take or hold one, instead of four loose arguments each.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..validation import check_flag, check_skip_modules, check_tile
from .tile_int4 import DEFAULT_ZERO_DTYPE, dtype_name, resolve_scale_dtype, resolve_zero_dtype

__all__ = ["TileInt4Spec", "resolve_spec"]


def _skip_tuple(skip_modules: Iterable[str] | str | None) -> tuple[str, ...]:
    return tuple(check_skip_modules(skip_modules))


@dataclass(frozen=True)
class TileInt4Spec:
    """A tile-INT4 quantization: ``W~ = alpha * q + beta`` with one ``(alpha, beta)`` per ``l1 x l2`` tile.

    Args:
        tile: ``(l1, l2)``: ``l1`` input features x ``l2`` output features share one scale and zero point.
        scale_dtype: storage dtype of alpha (float16, bfloat16 or float32, or their names).
        zero_dtype: storage dtype of beta; ``None`` means ``scale_dtype``. The default float32 keeps QA-BLoRA merges
            exact (see ``tile_int4.DEFAULT_ZERO_DTYPE``).
        skip_modules: linears kept in full precision, matched by module-name suffix.
        skip_indivisible: keep linears whose shape does not fit ``tile`` instead of raising.

    Values are checked and normalised on construction (``tile`` to two ints, dtypes to ``torch.dtype``), so two
    specs describing the same quantization compare equal.
    """

    tile: tuple[int, int] = (4, 8)
    scale_dtype: torch.dtype = torch.float16
    zero_dtype: torch.dtype | None = DEFAULT_ZERO_DTYPE
    skip_modules: tuple[str, ...] = field(default=("lm_head",))
    skip_indivisible: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "tile", check_tile(self.tile))
        scale_dtype = resolve_scale_dtype(self.scale_dtype)
        zero_dtype = scale_dtype if self.zero_dtype is None else resolve_zero_dtype(self.zero_dtype)
        object.__setattr__(self, "scale_dtype", scale_dtype)
        object.__setattr__(self, "zero_dtype", zero_dtype)
        object.__setattr__(self, "skip_modules", _skip_tuple(self.skip_modules))
        object.__setattr__(self, "skip_indivisible", check_flag("skip_indivisible", self.skip_indivisible))

    def bits_per_weight(self) -> float:
        """Storage bits per weight: ``4 + (bits(alpha) + bits(beta)) / (l1 * l2)``."""
        l1, l2 = self.tile
        return 4.0 + (torch.finfo(self.scale_dtype).bits + torch.finfo(self.zero_dtype).bits) / (l1 * l2)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form saved in ``config.json`` (``quantization_config`` without ``quant_method``)."""
        return {
            "tile": list(self.tile),
            "skip_modules": list(self.skip_modules),
            "scale_dtype": dtype_name(self.scale_dtype),
            "zero_dtype": dtype_name(self.zero_dtype),
            "skip_indivisible": self.skip_indivisible,
        }


def _normalised(field_name: str, value: Any) -> Any:
    """A loose field's value in its canonical form (dtype names to dtypes, module names to a tuple)."""
    if value is None:
        return None
    if field_name == "scale_dtype":
        return resolve_scale_dtype(value)
    if field_name == "zero_dtype":
        return resolve_zero_dtype(value)
    if field_name == "skip_modules":
        return _skip_tuple(value)
    return value


def resolve_spec(
    tile: TileInt4Spec | tuple[int, int] | list[int], defaults: dict[str, Any], **given: Any
) -> TileInt4Spec:
    """The spec of a call that takes either a :class:`TileInt4Spec` or loose fields (``tile`` plus ``given``).

    A spec comes back as it is; then every loose field must mean its default (``defaults``), otherwise a
    ``TypeError`` says so instead of ignoring the field.
    """
    if not isinstance(tile, TileInt4Spec):
        return TileInt4Spec(tile, **given)
    changed = [key for key, value in given.items() if _normalised(key, value) != _normalised(key, defaults[key])]
    if changed:
        raise TypeError(f"pass either a TileInt4Spec or {', '.join(changed)}, not both: the spec already sets them")
    return tile
