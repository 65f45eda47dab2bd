"""Fused dequantize-GEMM for a few dozen tokens (``y = x W~^T (+ b)``, 9..64 rows of ``x``; CUDA + Triton; opt-in).

Between the GEMV kernels (``gemv.py``, ``splitk.py``: products in registers, cost growing with the token count) and
dequantize + cuBLAS (writes and re-reads a 16-bit ``W~``), this kernel decodes a ``(BLOCK_N, BLOCK_K)`` block of
``W~`` in registers (``q * alpha + beta`` in float32, rounded to the activation dtype like ``dequantize_tiles``) and
feeds it to ``tl.dot`` (tensor cores) against a ``(BLOCK_M, BLOCK_K)`` block of ``x``; float32 accumulation, one
rounding at the end. The grid is ``(cdiv(D_out, BLOCK_N), cdiv(M, BLOCK_M), SPLIT_K)``; with ``SPLIT_K > 1`` the
partial sums are atomically added into a zeroed float32 buffer and bias / rounding follow in torch.

Opt-in: ``peft_balanced.settings.set_int4_gemm_max_tokens(64)`` sends 9..64 tokens here (default 0: nothing does)
until a GPU run shows it faster than dequantize + cuBLAS. It also runs under ``TRITON_INTERPRET=1`` on CPU tensors (there bf16 blocks are multiplied as float32: the interpreter's bf16
``tl.dot`` gives garbage in triton 3.9; bf16 x bf16 products are exact in float32, so only the summation order
differs from the GPU's tensor cores).
"""

from __future__ import annotations

import functools

import torch

from ...settings import get_int4_gemm_max_tokens
from .int4 import linear_with_kernel
from .support import triton_interpreting

__all__ = ["SMALL_GEMM_CONFIG", "small_gemm_linear", "small_gemm_supported", "tile_int4_small_gemm", "use_small_gemm"]

# NOT measured (no GPU time in the session that wrote this): a starting point for `int4_linear.py --tune-gemm`.
SMALL_GEMM_CONFIG = {"block_n": 64, "block_k": 128, "block_m": 64, "split_k": 1, "num_warps": 4, "num_stages": 3}


def small_gemm_supported(tile: tuple[int, int], dtype: torch.dtype, in_features: int) -> bool:
    """``l1`` a power of two up to 64 (a code block reshapes to ``(tiles, l1)``), ``D_in`` even, fp16 / bf16
    activations (``tl.dot`` operands)."""
    l1, l2 = tile
    return (
        l1 & (l1 - 1) == 0
        and l1 <= 64
        and l2 > 0
        and in_features % 2 == 0
        and dtype
        in (
            torch.float16,
            torch.bfloat16,
        )
    )


def use_small_gemm(
    tokens: int,
    tile: tuple[int, int],
    dtype: torch.dtype,
    in_features: int,
    device_type: str,
    triton_ok: bool,
    needs_param_grad: bool = False,
) -> bool:
    """Routing rule of ``TileInt4Linear.forward`` after the GEMV's: CUDA with Triton usable, ``1 <= tokens <=
    settings.get_int4_gemm_max_tokens()`` (0 by default: never), a supported layer, no gradient for scale/zero/bias."""
    return (
        device_type == "cuda"
        and triton_ok
        and 0 < tokens <= get_int4_gemm_max_tokens()
        and small_gemm_supported(tile, dtype, in_features)
        and not needs_param_grad
    )


@functools.lru_cache(maxsize=1)
def _build():
    import triton
    import triton.language as tl

    @triton.jit
    def small_gemm_kernel(
        x_ptr,
        q_ptr,
        s_ptr,
        z_ptr,
        b_ptr,
        y_ptr,
        M,
        N,
        K,
        n_tiles_in,
        k_per_split,
        stride_xm,
        L1: tl.constexpr,
        L2: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        ATOMIC: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        DOT_F32: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # output features
        ms = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # tokens
        row_ok = rows < N
        m_ok = ms < M
        q_rows = q_ptr + rows.to(tl.int64)[:, None] * (K // 2)
        t_rows = (rows // L2).to(tl.int64)[:, None] * n_tiles_in
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        start = tl.program_id(2) * k_per_split
        for k0 in range(start, start + k_per_split, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            xs = tl.load(
                x_ptr + ms[:, None] * stride_xm + ks[None, :], mask=m_ok[:, None] & (ks < K)[None, :], other=0.0
            )
            bytes_at = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            packed = tl.load(q_rows + bytes_at[None, :], mask=row_ok[:, None] & (bytes_at < K // 2)[None, :], other=0)
            packed = packed.to(tl.int32)
            codes = tl.reshape(tl.join(packed & 15, packed >> 4), (BLOCK_N, BLOCK_K // L1, L1))  # low nibble first
            tiles = k0 // L1 + tl.arange(0, BLOCK_K // L1)
            t_ok = row_ok[:, None] & (tiles < n_tiles_in)[None, :]
            alpha = tl.load(s_ptr + t_rows + tiles[None, :], mask=t_ok, other=0.0).to(tl.float32)
            beta = tl.load(z_ptr + t_rows + tiles[None, :], mask=t_ok, other=0.0).to(tl.float32)
            weight = codes.to(tl.float32) * alpha[:, :, None] + beta[:, :, None]
            weight = tl.reshape(weight, (BLOCK_N, BLOCK_K)).to(xs.dtype)  # rounded like dequantize_tiles
            if DOT_F32:  # the interpreter's bf16 tl.dot is wrong (triton 3.9); bf16 products are exact in fp32
                acc += tl.dot(xs.to(tl.float32), tl.trans(weight.to(tl.float32)), input_precision="ieee")
            else:
                acc += tl.dot(xs, tl.trans(weight))
        ok = m_ok[:, None] & row_ok[None, :]
        y = y_ptr + ms[:, None] * N + rows[None, :]
        if ATOMIC:
            tl.atomic_add(y, acc, mask=ok)
        else:
            if HAS_BIAS:
                acc += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=ok)

    return triton, small_gemm_kernel


def tile_int4_small_gemm(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    tile: tuple[int, int],
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """``x (M, D_in) -> x W~^T + bias`` as ``(M, D_out)`` in ``out_dtype`` (default ``x.dtype``), any ``M >= 1``.

    Needs ``small_gemm_supported(tile, x.dtype, D_in)`` and CUDA tensors (or CPU tensors under
    ``TRITON_INTERPRET=1``). ``config`` overrides keys of :data:`SMALL_GEMM_CONFIG`.
    """
    m, d_in = x.shape
    d_out = packed.shape[0]
    if not small_gemm_supported(tile, x.dtype, d_in):
        raise ValueError(
            f"tile_int4_small_gemm: tile={tile}, dtype={x.dtype}, D_in={d_in} not supported (l1 a power of two up "
            "to 64, D_in even, fp16 / bf16 activations)"
        )
    interpreting = triton_interpreting()
    if not (x.is_cuda or interpreting):
        raise RuntimeError("tile_int4_small_gemm needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
    l1, l2 = tile
    cfg = {**SMALL_GEMM_CONFIG, **(config or {})}
    triton, kernel = _build()
    block_k = max(cfg["block_k"], l1, 32)
    block_m = max(16, min(cfg["block_m"], triton.next_power_of_2(m)))  # tl.dot needs 16 rows or more
    steps = triton.cdiv(d_in, block_k)
    per_split = triton.cdiv(steps, max(cfg["split_k"], 1)) * block_k
    split_k = triton.cdiv(d_in, per_split)
    x = x.contiguous()
    out = out_dtype or x.dtype
    atomic = split_k > 1
    y = (
        torch.zeros(m, d_out, dtype=torch.float32, device=x.device)
        if atomic
        else torch.empty(m, d_out, dtype=out, device=x.device)
    )
    grid = (triton.cdiv(d_out, cfg["block_n"]), triton.cdiv(m, block_m), split_k)
    kernel[grid](
        x,
        packed.contiguous(),
        scale.contiguous(),
        zero.contiguous(),
        bias if bias is not None else y,
        y,
        m,
        d_out,
        d_in,
        d_in // l1,
        per_split,
        x.stride(0),
        L1=l1,
        L2=l2,
        BLOCK_M=block_m,
        BLOCK_N=cfg["block_n"],
        BLOCK_K=block_k,
        ATOMIC=atomic,
        HAS_BIAS=bias is not None,
        DOT_F32=interpreting and x.dtype == torch.bfloat16,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    if not atomic:
        return y
    if bias is not None:
        y = y + bias.float()
    return y.to(out)


def small_gemm_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    tile: tuple[int, int],
    bias: torch.Tensor | None = None,
) -> torch.Tensor:  # pragma: no cover - needs CUDA
    """``F.linear(x, W~, bias)`` for ``x (..., D_in)`` via :func:`tile_int4_small_gemm`; differentiable w.r.t. ``x``."""
    return linear_with_kernel(tile_int4_small_gemm, x, packed, scale, zero, tile, bias)
