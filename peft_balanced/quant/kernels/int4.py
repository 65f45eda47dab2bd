"""Optional Triton kernel for the CUDA path of :class:`~peft_balanced.quant.TileInt4Linear`.

The torch reference (``tile_int4.dequantize_tiles``) runs everywhere; on CUDA with Triton (>= 3.0, for
``tl.interleave``) installed, dequantization runs as one fused kernel instead of unpack / multiply / add passes
(``dequant_tiles_kernel`` when ``l1`` is an even power of two, ``dequant_kernel`` otherwise; timings in
docs/benchmarks.md). Both compute ``q * alpha + beta`` in float32 without FMA contraction and round once to the output
dtype, so they are bit-identical to the torch reference. The matmul itself stays ``F.linear`` (cuBLAS) here; for up
to a few dozen tokens ``TileInt4Linear`` may run a fused kernel instead (``route.py`` chooses).
``peft_balanced.set_kernel_preference("torch")`` forces the torch path.
"""

from __future__ import annotations

import functools

import torch

from ..tile_int4 import TileInt4Weight
from .support import TRITON_OPS, define_triton_op

__all__ = ["dequantize_tiles_on_device", "dequantized_linear", "triton_dequantize_tiles"]


@functools.lru_cache(maxsize=1)
def _build_kernel():  # pragma: no cover - needs CUDA
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

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
        # One program: BLOCK_R rows x BLOCK_C packed bytes -> BLOCK_R x (2 * BLOCK_C) contiguous outputs.
        rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        row_ok = rows[:, None] < d_out
        packed = tl.load(
            q_ptr + rows[:, None] * half_in + cols[None, :], mask=row_ok & (cols[None, :] < half_in), other=0
        )
        codes = tl.interleave((packed & 15).to(tl.float32), (packed >> 4).to(tl.float32))  # low nibble = even column
        in_cols = tl.program_id(1) * (2 * BLOCK_C) + tl.arange(0, 2 * BLOCK_C)
        mask = row_ok & (in_cols[None, :] < 2 * half_in)
        tile_idx = (rows // L2)[:, None] * n_tiles_in + (in_cols // L1)[None, :]
        scale = tl.load(s_ptr + tile_idx, mask=mask, other=0.0).to(tl.float32)
        zero = tl.load(z_ptr + tile_idx, mask=mask, other=0.0).to(tl.float32)
        weight = libdevice.mul_rn(codes, scale) + zero  # mul_rn: never contracted into an FMA
        out = out_ptr + rows[:, None] * (2 * half_in) + in_cols[None, :]
        tl.store(out, weight.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def dequant_tiles_kernel(
        q_ptr,
        s_ptr,
        z_ptr,
        out_ptr,
        d_out,
        n_tiles_in,
        L1: tl.constexpr,
        L2: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_T: tl.constexpr,
        EVEN: tl.constexpr,
    ):
        # For even power-of-two l1: one program = BLOCK_R rows x BLOCK_T tiles. Codes are (rows, tiles, l1) and
        # alpha/beta (rows, tiles): one contiguous load each instead of a gather per element.
        rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        tiles = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        ok = (rows[:, None] < d_out) & (tiles[None, :] < n_tiles_in)
        q_off = rows[:, None, None] * (n_tiles_in * (L1 // 2)) + tiles[None, :, None] * (L1 // 2)
        q_off += tl.arange(0, L1 // 2)[None, None, :]
        s_off = (rows // L2)[:, None] * n_tiles_in + tiles[None, :]
        if EVEN:
            packed = tl.load(q_ptr + q_off)
            scale = tl.load(s_ptr + s_off)
            zero = tl.load(z_ptr + s_off)
        else:
            packed = tl.load(q_ptr + q_off, mask=ok[:, :, None], other=0)
            scale = tl.load(s_ptr + s_off, mask=ok, other=0.0)
            zero = tl.load(z_ptr + s_off, mask=ok, other=0.0)
        packed = packed.to(tl.int32)
        codes = tl.reshape(tl.join(packed & 15, packed >> 4), (BLOCK_R, BLOCK_T, L1))  # low nibble = even column
        codes = (codes | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0  # exact int -> float, no I2F
        weight = libdevice.mul_rn(codes, scale.to(tl.float32)[:, :, None]) + zero.to(tl.float32)[:, :, None]
        weight = tl.reshape(weight, (BLOCK_R, BLOCK_T * L1)).to(out_ptr.dtype.element_ty)
        cols = tl.program_id(1) * (BLOCK_T * L1) + tl.arange(0, BLOCK_T * L1)
        out = out_ptr + rows[:, None] * (n_tiles_in * L1) + cols[None, :]
        if EVEN:
            tl.store(out, weight)
        else:
            tl.store(out, weight, mask=(rows[:, None] < d_out) & (cols[None, :] < n_tiles_in * L1))

    return triton, dequant_kernel, dequant_tiles_kernel


def triton_dequantize_tiles(
    weight: TileInt4Weight, out_dtype: torch.dtype, traced: bool = False
) -> torch.Tensor:  # pragma: no cover - needs CUDA
    """Triton version of ``dequantize_tiles``: ``W~ (D_out, D_in)`` in ``out_dtype``, the same bits; falls back to torch
    when not applicable. ``traced``: launch through ``torch.library.wrap_triton`` (the body of
    ``peft_balanced::tile_int4_dequantize``)."""
    packed, scale, zero, tile = weight
    usable = (
        packed.is_cuda
        and scale.device == packed.device
        and zero.device == packed.device
        and not (scale.requires_grad or zero.requires_grad)
        and out_dtype in (torch.float16, torch.bfloat16, torch.float32)
    )
    if not usable:
        return weight.dequantize(out_dtype)
    l1, l2 = tile
    d_out, half_in = packed.shape
    out = torch.empty(d_out, 2 * half_in, dtype=out_dtype, device=packed.device)
    triton, kernel, tiles_kernel = _build_kernel()
    if traced:
        kernel, tiles_kernel = torch.library.wrap_triton(kernel), torch.library.wrap_triton(tiles_kernel)
    if l1 % 2 == 0 and l1 & (l1 - 1) == 0 and l1 <= 64:
        n_tiles_in = (2 * half_in) // l1
        block_r, block_t = 8, max(512 // l1, 1)  # the best of 8 block shapes measured
        grid = (triton.cdiv(d_out, block_r), triton.cdiv(n_tiles_in, block_t))
        tiles_kernel[grid](
            packed.contiguous(),
            scale.contiguous(),
            zero.contiguous(),
            out,
            d_out,
            n_tiles_in,
            L1=l1,
            L2=l2,
            BLOCK_R=block_r,
            BLOCK_T=block_t,
            EVEN=d_out % block_r == 0 and n_tiles_in % block_t == 0,
            num_warps=4,
        )
        return out
    block_r, block_c = 16, 128  # the best of 7 block shapes measured
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
        num_warps=4,
    )
    return out


def dequantize_tiles_on_device(weight: TileInt4Weight, out_dtype: torch.dtype) -> torch.Tensor:
    """:func:`triton_dequantize_tiles`; under ``torch.compile`` the Triton op ``peft_balanced::tile_int4_dequantize``
    (dynamo records the op without tracing the building of the kernel; inductor launches the kernel itself)."""
    packed, scale, zero, (l1, l2) = weight
    traced = TRITON_OPS and torch.compiler.is_compiling() and not (scale.requires_grad or zero.requires_grad)
    if traced:
        return torch.ops.peft_balanced.tile_int4_dequantize(packed, scale, zero, l1, l2, out_dtype)
    return triton_dequantize_tiles(weight, out_dtype)


def _tile_int4_dequantize_op(
    packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, l1: int, l2: int, out_dtype: torch.dtype
) -> torch.Tensor:
    """:func:`triton_dequantize_tiles` with the tile as two ints: ``(D_out, D_in)`` in ``out_dtype``."""
    return triton_dequantize_tiles(TileInt4Weight(packed, scale, zero, (l1, l2)), out_dtype, traced=True)


if TRITON_OPS:
    define_triton_op("tile_int4_dequantize", _tile_int4_dequantize_op)


class _DequantizedLinear(torch.autograd.Function):
    """``F.linear(x, W~, bias)`` for a frozen tile-INT4 weight: ``W~`` is dequantized in the forward and again in the
    backward (``dx = dy W~``), never saved between them, so training holds no 16-bit copy of the weight. Dynamo
    traces it (the dequantize is the custom op under compile)."""

    @staticmethod
    def forward(ctx, x, packed, scale, zero, bias, l1, l2):
        ctx.save_for_backward(packed, scale, zero)
        ctx.tile = (l1, l2)
        weight = TileInt4Weight(packed, scale, zero, (l1, l2))
        return torch.nn.functional.linear(x, dequantize_tiles_on_device(weight, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        packed, scale, zero = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ dequantize_tiles_on_device(TileInt4Weight(packed, scale, zero, ctx.tile), grad.dtype)
        return grad_x, None, None, None, None, None, None


def dequantized_linear(x: torch.Tensor, weight: TileInt4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, W~, bias)``, ``x: (..., D_in)`` in the output dtype, through :class:`_DequantizedLinear`
    (the weight dequantized again for the input's gradient instead of saved); frozen ``scale``, ``zero``, ``bias``."""
    packed, scale, zero, (l1, l2) = weight
    return _DequantizedLinear.apply(x, packed, scale, zero, bias, l1, l2)


class _InputGradLinear(torch.autograd.Function):
    """A fused INT4 ``kernel`` forward with a backward for the input only: ``dx = dy W~`` (``W~`` dequantized for
    the step). The base weights are frozen, so nothing else needs a gradient."""

    @staticmethod
    def forward(ctx, x, packed, scale, zero, bias, tile, kernel):  # pragma: no cover - needs CUDA
        ctx.save_for_backward(packed, scale, zero)
        ctx.tile = tile
        return kernel(x, TileInt4Weight(packed, scale, zero, tile), bias)

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - needs CUDA
        packed, scale, zero = ctx.saved_tensors
        weight = dequantize_tiles_on_device(TileInt4Weight(packed, scale, zero, ctx.tile), grad.dtype)
        return grad @ weight, None, None, None, None, None, None


def linear_with_kernel(
    kernel, x: torch.Tensor, weight: TileInt4Weight, bias: torch.Tensor | None = None
) -> torch.Tensor:  # pragma: no cover - needs CUDA
    """``F.linear(x, W~, bias)`` for ``x (..., D_in)`` through ``kernel(x2d, weight, bias)`` (a 2-D fused forward);
    differentiable w.r.t. ``x``."""
    x2d = x.reshape(-1, x.shape[-1])
    if torch.is_grad_enabled() and x.requires_grad:
        y = _InputGradLinear.apply(x2d, weight.packed, weight.scale, weight.zero, bias, weight.tile, kernel)
    else:
        y = kernel(x2d, weight, bias)
    return y.reshape(*x.shape[:-1], weight.packed.shape[0])
