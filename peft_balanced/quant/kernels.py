"""Optional Triton kernel for the CUDA path of :class:`TileInt4Linear`.

The torch reference (``tile_int4.dequantize_tiles``) runs everywhere; on CUDA with Triton installed, the dequantize
step runs as one fused kernel instead of unpack / multiply / add passes. It computes ``q * alpha + beta`` in float32
without FMA contraction and rounds once to the output dtype, so it is bit-identical to the torch reference.
Set ``PEFT_BALANCED_DISABLE_TRITON=1`` to force the torch path.
"""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["_triton_available", "triton_dequantize_tiles"]


@functools.lru_cache(maxsize=1)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def _triton_available() -> bool:
    """True when the Triton dequantize kernel can run: CUDA present, Triton importable, not disabled by env."""
    if os.environ.get("PEFT_BALANCED_DISABLE_TRITON", "0") not in ("", "0", "false", "False"):
        return False
    return torch.cuda.is_available() and _triton_importable()


@functools.lru_cache(maxsize=1)
def _build_kernel():  # pragma: no cover - needs CUDA
    import triton
    import triton.language as tl

    @triton.jit
    def dequant_kernel(
        q_ptr,
        s_ptr,
        z_ptr,
        out_ptr,
        d_out,
        half_in,
        n_tiles_in,
        L1: tl.constexpr,
        L2: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        cols = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)  # byte columns
        mask = (rows[:, None] < d_out) & (cols[None, :] < half_in)
        packed = tl.load(q_ptr + rows[:, None] * half_in + cols[None, :], mask=mask, other=0)
        tile_row = (rows // L2)[:, None] * n_tiles_in
        in_even = cols * 2
        in_odd = in_even + 1
        s_even = tl.load(s_ptr + tile_row + (in_even // L1)[None, :], mask=mask, other=0.0).to(tl.float32)
        z_even = tl.load(z_ptr + tile_row + (in_even // L1)[None, :], mask=mask, other=0.0).to(tl.float32)
        s_odd = tl.load(s_ptr + tile_row + (in_odd // L1)[None, :], mask=mask, other=0.0).to(tl.float32)
        z_odd = tl.load(z_ptr + tile_row + (in_odd // L1)[None, :], mask=mask, other=0.0).to(tl.float32)
        w_even = (packed & 15).to(tl.float32) * s_even + z_even
        w_odd = (packed >> 4).to(tl.float32) * s_odd + z_odd
        base = out_ptr + rows[:, None] * (2 * half_in)
        out_ty = out_ptr.dtype.element_ty
        tl.store(base + in_even[None, :], w_even.to(out_ty), mask=mask)
        tl.store(base + in_odd[None, :], w_odd.to(out_ty), mask=mask)

    return triton, dequant_kernel


def triton_dequantize_tiles(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    tile: tuple[int, int],
    out_dtype: torch.dtype,
) -> torch.Tensor:  # pragma: no cover - needs CUDA
    """Triton version of ``dequantize_tiles`` (same arguments and result); falls back to torch when not applicable."""
    from .tile_int4 import dequantize_tiles

    usable = (
        packed.is_cuda
        and scale.device == packed.device
        and zero.device == packed.device
        and not (scale.requires_grad or zero.requires_grad)
        and out_dtype in (torch.float16, torch.bfloat16, torch.float32)
    )
    if not usable:
        return dequantize_tiles(packed, scale, zero, tile, out_dtype)
    l1, l2 = tile
    d_out, half_in = packed.shape
    out = torch.empty(d_out, 2 * half_in, dtype=out_dtype, device=packed.device)
    triton, kernel = _build_kernel()
    block_r, block_c = 32, 64
    grid = (triton.cdiv(d_out, block_r), triton.cdiv(half_in, block_c))
    kernel[grid](
        packed.contiguous(),
        scale.contiguous(),
        zero.contiguous(),
        out,
        d_out,
        half_in,
        (2 * half_in) // l1,
        L1=l1,
        L2=l2,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        enable_fp_fusion=False,
    )
    return out
