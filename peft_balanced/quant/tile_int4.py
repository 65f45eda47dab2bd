"""2-D-tile asymmetric INT4 quantization (round-to-nearest, min-max, no calibration data).

Torch convention: a weight ``W`` has shape ``(D_out, D_in)``. A tile ``(l1, l2)`` groups ``l1`` consecutive input
features and ``l2`` consecutive output features; each tile ``t = (j // l2, i // l1)`` has one scale ``alpha[t]`` and
one zero point ``beta[t]``::

    W~[j, i] = alpha[j // l2, i // l1] * q[j, i] + beta[j // l2, i // l1],    q in {0, ..., 15}

``alpha`` and ``beta`` have shape ``(D_out // l2, D_in // l1)``, each in its own storage dtype (``scale_dtype``,
``zero_dtype``: float16, bfloat16 or float32; ``beta`` takes ``alpha``'s unless told otherwise). Codes are packed two
per byte along the input dimension: ``packed[j, k] = q[j, 2k] | (q[j, 2k + 1] << 4)``, shape ``(D_out, D_in // 2)``,
dtype ``uint8``.

Rounding of the stored scale/zero is directed so that every tile's range ``[min, max]`` stays inside
``[beta, beta + 15 * alpha]``: ``beta`` is rounded down and ``alpha`` up in the storage dtype. Hence the
reconstruction error of each element is at most ``alpha / 2`` of the *stored* ``alpha``, whatever the storage dtype,
and a constant tile whose value is representable in the storage dtype is reconstructed exactly (``alpha = 0``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..validation import check_tile

__all__ = [
    "DEFAULT_ZERO_DTYPE",
    "QMAX",
    "TileInt4Weight",
    "check_tile_shape",
    "dequantize_tiles",
    "pack_int4",
    "quantize_tiles",
    "resolve_scale_dtype",
    "resolve_zero_dtype",
    "unpack_int4",
]

QMAX = 15  # largest 4-bit code

# Zero-point dtype of every entry point (quantize_tiles, TileInt4Linear, TileInt4Spec, quantize_model,
# TileInt4Config; None means the scale's dtype). A QA-BLoRA merge shifts beta and rounds it once into this dtype;
# on SmolLM2-135M (trained adapters, 4x8 and 8x8 tiles) fp16 beta puts merged logits 1.0e-3 to 1.3e-2 (bf16: 2.9e-2 to
# 0.2) away from the adapter-attached model, fp32 beta <= 3e-6 (benchmarks/studies/qablora_merge_error.py), for 16
# more bits per tile (5.0 -> 5.5 bits per weight at 4x8, 4.5 -> 4.75 at 8x8).
DEFAULT_ZERO_DTYPE = torch.float32

_SCALE_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}


class TileInt4Weight(NamedTuple):
    """One weight in the format: what every tile-INT4 kernel reads (``TileInt4Linear.packed_weight`` builds it).

    ``packed``: ``uint8 (D_out, D_in // 2)``; ``scale`` (alpha) and ``zero`` (beta): ``(D_out // l2, D_in // l1)``;
    ``tile``: ``(l1, l2)``.
    """

    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    tile: tuple[int, int]

    @property
    def shape(self) -> tuple[int, int]:
        """``(D_out, D_in)`` of the weight."""
        return self.packed.shape[0], 2 * self.packed.shape[1]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``W~`` as ``(D_out, D_in)`` in ``dtype`` (the torch reference, :func:`dequantize_tiles`)."""
        return dequantize_tiles(self.packed, self.scale, self.zero, self.tile, dtype)


def resolve_scale_dtype(scale_dtype: torch.dtype | str) -> torch.dtype:
    """Map ``torch.float16 | torch.bfloat16 | torch.float32`` or their names ("float16", "bf16", ...) to a dtype."""
    if isinstance(scale_dtype, torch.dtype):
        if scale_dtype in (torch.float16, torch.bfloat16, torch.float32):
            return scale_dtype
    elif isinstance(scale_dtype, str):
        key = scale_dtype.removeprefix("torch.").lower()
        if key in _SCALE_DTYPES:
            return _SCALE_DTYPES[key]
    raise ValueError(
        f"scale_dtype must be float16, bfloat16 or float32 (a torch.dtype or its name), got {scale_dtype!r}"
    )


def resolve_zero_dtype(zero_dtype: torch.dtype | str) -> torch.dtype:
    """Like :func:`resolve_scale_dtype`, for the zero point (errors name ``zero_dtype``)."""
    try:
        return resolve_scale_dtype(zero_dtype)
    except ValueError:
        raise ValueError(
            f"zero_dtype must be float16, bfloat16 or float32 (a torch.dtype or its name) or None (the scale's "
            f"dtype), got {zero_dtype!r}"
        ) from None


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"`` (for JSON configs)."""
    return str(dtype).removeprefix("torch.")


def check_tile_shape(out_features: int, in_features: int, tile: tuple[int, int], name: str | None = None) -> None:
    """Raise ``ValueError`` naming the layer if ``(D_out, D_in)`` cannot be split into ``tile`` or packed."""
    l1, l2 = tile
    where = f"layer {name!r}" if name else "weight"
    problems = []
    if in_features % l1:
        problems.append(f"D_in={in_features} is not divisible by l1={l1}")
    if out_features % l2:
        problems.append(f"D_out={out_features} is not divisible by l2={l2}")
    if in_features % 2:
        problems.append(f"D_in={in_features} is odd (two 4-bit codes are packed per byte along D_in)")
    if problems:
        raise ValueError(
            f"cannot quantize {where} of shape (D_out={out_features}, D_in={in_features}) with tile=({l1}, {l2}): "
            + "; ".join(problems)
        )


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes two per byte along the last dimension.

    Args:
        codes: integer tensor ``(..., n)`` with values in ``0..15`` and ``n`` even.

    Returns:
        ``uint8`` tensor ``(..., n // 2)``; element ``k`` holds ``codes[..., 2k]`` in the low nibble and
        ``codes[..., 2k + 1]`` in the high nibble.
    """
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dimension, got shape {tuple(codes.shape)}")
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``uint8 (..., n // 2)`` -> ``uint8 (..., n)`` codes in ``0..15``."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_int4 expects a uint8 tensor, got {packed.dtype}")
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def _tiled(x: torch.Tensor, tile: tuple[int, int]) -> torch.Tensor:
    """View ``(D_out, D_in)`` as ``(D_out // l2, l2, D_in // l1, l1)``."""
    l1, l2 = tile
    d_out, d_in = x.shape
    return x.reshape(d_out // l2, l2, d_in // l1, l1)


def _round_toward(x32: torch.Tensor, dtype: torch.dtype, down: bool) -> torch.Tensor:
    """Round fp32 ``x32`` to ``dtype`` toward -inf (``down``) or +inf, so that the result bounds ``x32``."""
    y = x32.to(dtype)
    if dtype == torch.float32:
        return y
    bad = y.float() > x32 if down else y.float() < x32
    if bool(bad.any()):
        target = torch.full_like(y, float("-inf") if down else float("inf"))
        y = torch.where(bad, torch.nextafter(y, target), y)
    return y


@torch.no_grad()
def quantize_tiles(
    weight: torch.Tensor,
    tile: tuple[int, int] = (4, 8),
    scale_dtype: torch.dtype | str = torch.float16,
    name: str | None = None,
    zero_dtype: torch.dtype | str | None = DEFAULT_ZERO_DTYPE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``weight`` to asymmetric min-max INT4 with one scale/zero per ``l1 x l2`` tile.

    Args:
        weight: floating tensor ``(D_out, D_in)``; ``D_in % l1 == 0``, ``D_out % l2 == 0``, ``D_in`` even.
        tile: ``(l1, l2)``: ``l1`` input features x ``l2`` output features per tile.
        scale_dtype: storage dtype of ``scale`` (float16, bfloat16 or float32, or their names).
        name: layer name used in error messages.
        zero_dtype: storage dtype of ``zero`` (default :data:`DEFAULT_ZERO_DTYPE`); ``None`` means ``scale_dtype``.

    Returns:
        ``(packed, scale, zero)``: ``packed`` is ``uint8 (D_out, D_in // 2)`` (see :func:`pack_int4`);
        ``scale`` (alpha) and ``zero`` (beta) are ``(D_out // l2, D_in // l1)`` in ``scale_dtype`` and
        ``zero_dtype``. All on ``weight``'s device.
    """
    tile = check_tile(tile)
    scale_dtype = resolve_scale_dtype(scale_dtype)
    zero_dtype = scale_dtype if zero_dtype is None else resolve_zero_dtype(zero_dtype)
    where = f"layer {name!r}" if name else "weight"
    if weight.dim() != 2:
        raise ValueError(f"{where}: expected a 2-D weight (D_out, D_in), got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"{where}: expected a floating-point weight, got {weight.dtype}")
    d_out, d_in = weight.shape
    check_tile_shape(d_out, d_in, tile, name)

    w = weight.detach().float()
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{where}: weight contains NaN or inf; cannot quantize")
    tiles = _tiled(w, tile)
    w_min = tiles.amin(dim=(1, 3))
    w_max = tiles.amax(dim=(1, 3))

    zero = _round_toward(w_min, zero_dtype, down=True)
    # Divide by a tensor, not a Python scalar: CUDA turns `x / 15` into `x * (1/15)`, which would make codes
    # depend on the device. Every step here is IEEE-exact elementwise math, so CPU and CUDA give identical bits.
    qmax = torch.full_like(w_max, float(QMAX))
    scale = _round_toward((w_max - zero.float()) / qmax, scale_dtype, down=False)
    if not (bool(torch.isfinite(zero).all()) and bool(torch.isfinite(scale).all())):
        raise ValueError(
            f"{where}: weight range overflows {dtype_name(scale_dtype)} scales / {dtype_name(zero_dtype)} zeros "
            f"(|w| up to {w.abs().max().item():.3g}); use scale_dtype='float32' and zero_dtype='float32'"
        )

    scale32 = scale.float()[:, None, :, None]
    zero32 = zero.float()[:, None, :, None]
    safe_scale = torch.where(scale32 > 0, scale32, torch.ones_like(scale32))
    codes = torch.round((tiles - zero32) / safe_scale)
    codes = torch.where(scale32 > 0, codes, torch.zeros_like(codes)).clamp_(0, QMAX)
    packed = pack_int4(codes.reshape(d_out, d_in).to(torch.uint8))
    return packed, scale, zero


def dequantize_tiles(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    tile: tuple[int, int] = (4, 8),
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Reconstruct ``W~ = alpha * q + beta`` from packed codes.

    Args:
        packed: ``uint8 (D_out, D_in // 2)`` from :func:`quantize_tiles`.
        scale: alpha, ``(D_out // l2, D_in // l1)``.
        zero: beta, ``(D_out // l2, D_in // l1)``.
        tile: ``(l1, l2)``.
        out_dtype: dtype of the result. Arithmetic is done in float32 and cast once, so the result is the
            correctly rounded ``alpha * q + beta`` of the stored values (identical on every device).

    Returns:
        ``(D_out, D_in)`` tensor in ``out_dtype``. Differentiable w.r.t. ``scale``/``zero`` if they require grad.
    """
    l1, l2 = check_tile(tile)
    d_out, d_in = packed.shape[0], packed.shape[1] * 2
    expected = (d_out // l2, d_in // l1)
    if d_out % l2 or d_in % l1 or tuple(scale.shape) != expected or tuple(zero.shape) != expected:
        raise ValueError(
            f"dequantize_tiles: packed {tuple(packed.shape)} (weight ({d_out}, {d_in})) with tile=({l1}, {l2}) needs "
            f"scale/zero of shape {expected}, got {tuple(scale.shape)} and {tuple(zero.shape)}"
        )
    codes = _tiled(unpack_int4(packed), (l1, l2)).float()
    w = codes * scale.float()[:, None, :, None] + zero.float()[:, None, :, None]
    return w.reshape(d_out, d_in).to(out_dtype)
