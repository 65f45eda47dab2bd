"""``quantize_model``: turn the linears of a model into :class:`TileInt4Linear` layers, in place."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..utils import set_submodule
from .hf import attach_quantization_config, tied_module_names
from .linear import TileInt4Linear
from .select import check_skip_modules_match, iter_quantizable_linears
from .spec import TileInt4Spec, resolve_spec
from .tile_int4 import DEFAULT_ZERO_DTYPE

__all__ = ["quantize_model"]

_LOOSE_DEFAULTS = {
    "scale_dtype": torch.float16,
    "zero_dtype": DEFAULT_ZERO_DTYPE,
    "skip_modules": ("lm_head",),
    "skip_indivisible": False,
}


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    tile: TileInt4Spec | tuple[int, int] = (4, 8),
    skip_modules: Iterable[str] = ("lm_head",),
    scale_dtype: torch.dtype | str = torch.float16,
    skip_indivisible: bool = False,
    zero_dtype: torch.dtype | str | None = DEFAULT_ZERO_DTYPE,
) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` of ``model`` by a :class:`TileInt4Linear`; returns ``model``.

    Args:
        model: any module; a transformers ``PreTrainedModel`` also gets a ``TileInt4Config`` as its
            ``config.quantization_config`` and a quantizer, so that ``save_pretrained`` writes a checkpoint that
            ``from_pretrained(path)`` reloads bit-exactly.
        tile: a :class:`TileInt4Spec` (then the other arguments must keep their defaults), or ``(l1, l2)``: input x
            output features per tile.
        skip_modules: module names kept in full precision, matched by suffix (``"lm_head"`` matches
            ``"model.lm_head"``). Linears with tied weights (transformers ``all_tied_weights_keys``) are kept too.
        scale_dtype: storage dtype of the scales (alpha).
        skip_indivisible: keep linears whose shape does not fit ``tile`` instead of raising.
        zero_dtype: storage dtype of the zero points (beta); ``None`` means ``scale_dtype``. The default float32
            keeps QA-BLoRA merges (which shift beta) at float32 precision for 16 more bits per tile than fp16 (4x8
            tiles: 5.5 instead of 5.0 bits per weight); fp16 beta costs ~1e-3 relative error in merged logits (see
            ``DEFAULT_ZERO_DTYPE``). GGUF Q4_1 export needs ``"float16"``.
    """
    loose = {"scale_dtype": scale_dtype, "zero_dtype": zero_dtype, "skip_modules": skip_modules}
    spec = resolve_spec(tile, _LOOSE_DEFAULTS, **loose, skip_indivisible=skip_indivisible)
    if isinstance(model, nn.Linear):
        raise ValueError("quantize_model expects a model containing linears; use TileInt4Linear.from_linear")
    _refuse_quantized(model, spec)
    check_skip_modules_match(model, spec.skip_modules, default=_LOOSE_DEFAULTS["skip_modules"])
    targets = list(iter_quantizable_linears(model, spec, also_skip=tied_module_names(model)))
    if not targets:
        raise ValueError(
            f"quantize_model found no linear of {type(model).__name__} to quantize with tile={spec.tile} "
            f"(skip_modules={list(spec.skip_modules)}, skip_indivisible={spec.skip_indivisible}): it needs a model "
            "with torch.nn.Linear layers holding 16- or 32-bit float weights"
        )
    for name, linear in targets:
        set_submodule(model, name, TileInt4Linear.from_linear(linear, spec, name=name))
    attach_quantization_config(model, spec)
    return model


def _refuse_quantized(model: nn.Module, spec: TileInt4Spec) -> None:
    """Raise if ``model`` already holds tile-INT4 layers: re-quantizing would leave them at their old tile while the
    model's ``quantization_config`` said ``spec``."""
    quantized = [(name, module) for name, module in model.named_modules() if isinstance(module, TileInt4Linear)]
    if quantized:
        name, module = quantized[0]
        raise ValueError(
            f"quantize_model: {type(model).__name__} is already tile-INT4 ({len(quantized)} layers, e.g. {name!r} "
            f"with tile={module.tile}); asked for tile={spec.tile}. Quantize the 16-bit model instead (reload it, "
            "or dequantize it first with model.dequantize())"
        )
