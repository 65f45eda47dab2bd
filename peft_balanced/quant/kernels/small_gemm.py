"""Fused dequantize-GEMM for few tokens: ``y = x W~^T (+ b)`` from the packed 2-D-tile INT4 format (CUDA + Triton).

A program decodes a ``(BLOCK_N, BLOCK_K)`` block of ``W~`` in registers and feeds it to ``tl.dot`` (tensor cores)
against a ``(BLOCK_M, BLOCK_K)`` block of ``x``; float32 accumulation, one rounding at the end. The weight is read
once per ``BLOCK_M`` tokens as 4-bit codes, so up to a few dozen tokens the kernel is bound by reading the codes (plus
alpha/beta), not by the product.

Decoding keeps the conversion units idle: byte ``p`` holds the codes of inputs ``2j`` (low nibble) and ``2j + 1``
(high nibble); a code ``q`` or-ed into the bits of ``2^23`` reads ``2^23 + q`` as a float, so ``q`` is one subtraction
away (no int-to-float conversion). The even and odd inputs are two ``tl.dot`` calls (``x[:, 0::2] @ W~[:, 0::2]^T +
x[:, 1::2] @ W~[:, 1::2]^T``), so the two nibbles of a byte are never interleaved in registers. Each weight is
``q * alpha + beta`` in float32 without FMA contraction, rounded to the activation dtype: bit-identical to
``dequantize_tiles`` (the same decoded weight the dequantize + cuBLAS path multiplies).

The grid is ``(cdiv(D_out, BLOCK_N), cdiv(M, BLOCK_M), SPLIT_K)``. With ``SPLIT_K > 1`` every slice of ``D_in``
stores its float32 partial sums in its own plane of a ``(SPLIT_K, M, D_out)`` buffer, and a second kernel adds the
planes in a fixed order (then the bias, then one rounding): the result does not depend on scheduling, so a CUDA-graph
replay and a compiled call equal the eager call bit for bit.

The block shape per token count comes from :mod:`.tuning` (measured once per layer shape on the device, or a default).
The kernel also runs under ``TRITON_INTERPRET=1`` on CPU tensors (there bf16 blocks are multiplied as float32: the
interpreter's bf16 ``tl.dot`` is wrong in triton 3.x; bf16 x bf16 products are exact in float32, so only the
summation order differs from the GPU's tensor cores).
"""

from __future__ import annotations

import functools

import torch

from ..tile_int4 import TileInt4Weight
from .support import matmul_op, triton_interpreting

__all__ = ["DEFAULT_CONFIG", "small_gemm_supported", "tile_int4_small_gemm"]

# Keys of a block shape; the default suits few tokens on a large layer (tuning.py measures the best per shape).
DEFAULT_CONFIG = {"block_n": 32, "block_k": 256, "block_m": 16, "split_k": 1, "num_warps": 4, "num_stages": 3}


def small_gemm_supported(tile: tuple[int, int], dtype: torch.dtype, in_features: int) -> bool:
    """``l1`` an even power of two up to 64, ``D_in`` a multiple of 32 (one step reads at least 32 inputs), fp16 /
    bf16 activations (``tl.dot`` operands)."""
    l1, l2 = tile
    return (
        l1 >= 2
        and l1 & (l1 - 1) == 0
        and l1 <= 64
        and l2 > 0
        and in_features % 32 == 0
        and dtype in (torch.float16, torch.bfloat16)
    )


@functools.lru_cache(maxsize=1)
def _build():
    import triton
    import triton.language as tl
    import triton.language.extra.libdevice  # noqa: F401  (tl.extra.libdevice)

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
        PARTIAL: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        INTERPRETED: tl.constexpr,
    ):
        HALF: tl.constexpr = BLOCK_K // 2  # bytes (pairs of inputs) per row and step
        PER_TILE: tl.constexpr = L1 // 2  # bytes per tile along D_in
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # output features
        ms = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # tokens
        row_ok = rows < N
        m_ok = ms < M
        q_rows = q_ptr + rows.to(tl.int64)[:, None] * (K // 2)
        t_rows = (rows // L2).to(tl.int64)[:, None] * n_tiles_in
        x_rows = x_ptr + ms.to(tl.int64)[:, None] * stride_xm
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        start = tl.program_id(2) * k_per_split
        for step in range(0, k_per_split // BLOCK_K):
            k0 = start + step * BLOCK_K
            j = k0 // 2 + tl.arange(0, HALF)  # byte columns
            j_ok = j < K // 2
            packed = tl.load(q_rows + j[None, :], mask=row_ok[:, None] & j_ok[None, :], other=0).to(tl.int32)
            tiles = k0 // L1 + tl.arange(0, BLOCK_K // L1)
            t_ok = row_ok[:, None] & (tiles < n_tiles_in)[None, :]
            alpha = tl.load(s_ptr + t_rows + tiles[None, :], mask=t_ok, other=0.0).to(tl.float32)
            beta = tl.load(z_ptr + t_rows + tiles[None, :], mask=t_ok, other=0.0).to(tl.float32)
            alpha = tl.reshape(tl.broadcast_to(alpha[:, :, None], (BLOCK_N, BLOCK_K // L1, PER_TILE)), (BLOCK_N, HALF))
            beta = tl.reshape(tl.broadcast_to(beta[:, :, None], (BLOCK_N, BLOCK_K // L1, PER_TILE)), (BLOCK_N, HALF))
            x_ok = m_ok[:, None] & j_ok[None, :]
            x_even = tl.load(x_rows + 2 * j[None, :], mask=x_ok, other=0.0)
            x_odd = tl.load(x_rows + 2 * j[None, :] + 1, mask=x_ok, other=0.0)
            # a code q or-ed into the bits of the float 2^23 reads 2^23 + q: no int -> float conversion
            q_even = ((packed & 15) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
            q_odd = ((packed >> 4) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
            # q * alpha + beta without FMA contraction (mul_rn), rounded once: as dequantize_tiles
            if INTERPRETED:  # numpy never contracts (and the interpreter has no libdevice)
                w_even = (q_even * alpha + beta).to(x_even.dtype)
                w_odd = (q_odd * alpha + beta).to(x_even.dtype)
            else:
                w_even = (tl.extra.libdevice.mul_rn(q_even, alpha) + beta).to(x_even.dtype)
                w_odd = (tl.extra.libdevice.mul_rn(q_odd, alpha) + beta).to(x_even.dtype)
            if (
                INTERPRETED and x_even.dtype == tl.bfloat16
            ):  # the interpreter's bf16 tl.dot is wrong; bf16 products are exact in float32
                acc += tl.dot(x_even.to(tl.float32), tl.trans(w_even.to(tl.float32)), input_precision="ieee")
                acc += tl.dot(x_odd.to(tl.float32), tl.trans(w_odd.to(tl.float32)), input_precision="ieee")
            else:
                acc += tl.dot(x_even, tl.trans(w_even))
                acc += tl.dot(x_odd, tl.trans(w_odd))
        ok = m_ok[:, None] & row_ok[None, :]
        if PARTIAL:  # this slice's plane of the (SPLIT_K, M, N) float32 buffer
            y = y_ptr + tl.program_id(2).to(tl.int64) * M * N + ms[:, None] * N + rows[None, :]
            tl.store(y, acc, mask=ok)
        else:
            if HAS_BIAS:
                acc += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + ms[:, None] * N + rows[None, :], acc.to(y_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def sum_planes_kernel(
        p_ptr, b_ptr, y_ptr, MN, N, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr
    ):
        # y = sum of the SPLIT planes in order 0, 1, ... (+ bias), rounded once to y's dtype
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < MN
        acc = tl.load(p_ptr + offs, mask=ok, other=0.0)
        for plane in tl.static_range(1, SPLIT):
            acc += tl.load(p_ptr + plane * MN + offs, mask=ok, other=0.0)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs % N, mask=ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=ok)

    return triton, small_gemm_kernel, sum_planes_kernel


def _launch(
    x: torch.Tensor,
    weight: TileInt4Weight,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    config: dict[str, int],
    traced: bool = False,
) -> torch.Tensor:
    packed, scale, zero, tile = weight
    m, d_in = x.shape
    d_out = packed.shape[0]
    l1, l2 = tile
    triton, kernel, sum_planes = _build()
    if traced:
        kernel, sum_planes = torch.library.wrap_triton(kernel), torch.library.wrap_triton(sum_planes)
    block_k = max(config["block_k"], l1, 32)
    block_m = max(16, min(config["block_m"], triton.next_power_of_2(m)))  # tl.dot needs 16 rows or more
    steps = triton.cdiv(d_in, block_k)
    per_split = triton.cdiv(steps, max(config["split_k"], 1)) * block_k
    split_k = triton.cdiv(d_in, per_split)
    partial = split_k > 1
    shape = (split_k, m, d_out) if partial else (m, d_out)
    y = torch.empty(shape, dtype=torch.float32 if partial else out_dtype, device=x.device)
    grid = (triton.cdiv(d_out, config["block_n"]), triton.cdiv(m, block_m), split_k)
    kernel[grid](
        x,
        packed,
        scale,
        zero,
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
        BLOCK_N=config["block_n"],
        BLOCK_K=block_k,
        PARTIAL=partial,
        HAS_BIAS=bias is not None,
        INTERPRETED=triton_interpreting(),
        num_warps=config["num_warps"],
        num_stages=config["num_stages"],
    )
    if not partial:
        return y
    out = torch.empty(m, d_out, dtype=out_dtype, device=x.device)
    block = 1024
    sum_planes[(triton.cdiv(m * d_out, block),)](
        y,
        bias if bias is not None else out,
        out,
        m * d_out,
        d_out,
        SPLIT=split_k,
        HAS_BIAS=bias is not None,
        BLOCK=block,
    )
    return out


_run = matmul_op("tile_int4_small_gemm", _launch, tuple(DEFAULT_CONFIG))


def tile_int4_small_gemm(
    x: torch.Tensor,
    weight: TileInt4Weight,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """``x (M, D_in) -> x W~^T + bias`` as ``(M, D_out)`` in ``out_dtype`` (default ``x.dtype``), any ``M >= 1``.

    Needs ``small_gemm_supported(weight.tile, x.dtype, D_in)`` and CUDA tensors (or CPU tensors under
    ``TRITON_INTERPRET=1``). ``config`` overrides keys of :data:`DEFAULT_CONFIG`. Under ``torch.compile`` it is the op
    ``peft_balanced::tile_int4_small_gemm``.
    """
    d_in = x.shape[1]
    if not small_gemm_supported(weight.tile, x.dtype, d_in):
        raise ValueError(
            f"tile_int4_small_gemm: tile={weight.tile}, dtype={x.dtype}, D_in={d_in} not supported (l1 an even power "
            "of two up to 64, D_in a multiple of 32, fp16 / bf16 activations)"
        )
    if not (x.is_cuda or triton_interpreting()):
        raise RuntimeError("tile_int4_small_gemm needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
    return _run(x, weight, bias, out_dtype or x.dtype, {**DEFAULT_CONFIG, **(config or {})})
