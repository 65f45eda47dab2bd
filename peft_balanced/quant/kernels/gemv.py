"""Fused one-token matmul ``y = x W~^T (+ b)`` straight from the packed 2-D-tile INT4 format (CUDA + Triton).

For one token the matmul is bound by reading the weight, so reading 4-bit codes (plus alpha/beta) instead of a
16-bit ``W~`` is the whole gain; the kernel never materialises ``W~``. Per tile ``t`` of ``l1`` inputs::

    y[j] = sum_t alpha[j, t] * (sum_{i in t} x[i] q[j, i]) + beta[j, t] * S[t],   S[t] = sum_{i in t} x[i]

so the zero point costs one multiply per tile (``S`` is pooled from ``x`` inside the kernel), not one per weight.
Codes are read as words of ``C`` nibbles (``C`` in 8, 4, 2 divides ``l1``: int32 / int16 / uint8 views of
``qweight``), one alpha/beta per word. A nibble ``q`` becomes a float without int-to-float conversion by placing it
in the mantissa of 1.0: at bits 19..22 it reads ``f = 1 + q / 16`` and at bits 15..18 ``1 + q / 256``, so one shift
decodes two nibbles and ``sum x q = 16 (sum x f - sum x)``. Accumulation is float32; the result is rounded once to
the output dtype. More tokens go to :mod:`.small_gemm` (tensor cores); :mod:`.route` chooses.

:func:`gemv_reference` is the tile decomposition in torch (runs on CPU; used by the tests).
"""

from __future__ import annotations

import functools

import torch

from ..tile_int4 import TileInt4Weight, unpack_int4
from .support import matmul_op

__all__ = ["GEMV_CONFIG", "gemv_reference", "gemv_supported", "tile_int4_gemv", "word_nibbles"]

_WORD_DTYPES = {8: torch.int32, 4: torch.int16, 2: torch.uint8}

# Output rows per program, code words per step, warps: the best of the int4 linear benchmark's sweep (4096 -> 11008,
# 4x8 tiles; docs/benchmarks.md).
GEMV_CONFIG = {"rows": 8, "block_w": 256, "num_warps": 4}


def word_nibbles(l1: int) -> int:
    """Nibbles per code word read by the kernel: the largest of 8, 4, 2 dividing ``l1``; 0 if ``l1`` is odd."""
    return next((c for c in (8, 4, 2) if l1 % c == 0), 0)


def gemv_supported(tile: tuple[int, int], dtype: torch.dtype) -> bool:
    """Whether the kernel handles this tile and activation dtype: ``l1`` even, ``l2`` a power of two (at most 64),
    activations in fp16, bf16 or fp32."""
    l1, l2 = tile
    pow2 = l2 & (l2 - 1) == 0 and l2 <= 64
    return word_nibbles(l1) > 0 and pow2 and dtype in (torch.float16, torch.bfloat16, torch.float32)


def gemv_reference(x: torch.Tensor, weight: TileInt4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Torch version of the kernel's decomposition, in float32: ``(M, D_in) -> (M, D_out)`` float32."""
    packed, scale, zero, (l1, l2) = weight
    m, d_in = x.shape
    d_out = packed.shape[0]
    x32 = x.float().reshape(m, d_in // l1, l1)
    f = 1 + unpack_int4(packed).float().reshape(d_out, d_in // l1, l1) / 16  # the kernel's 1 + q / 16
    dots = torch.einsum("mti,jti->mjt", x32, f)  # sum_{i in t} x_i f_ji
    pooled = x32.sum(-1)  # S[m, t]
    a16 = 16 * scale.float().repeat_interleave(l2, 0)  # (D_out, D_in / l1)
    coef = zero.float().repeat_interleave(l2, 0) - a16
    y = (dots * a16).sum(-1) + pooled @ coef.T
    return y if bias is None else y + bias.float()


@functools.lru_cache(maxsize=1)
def _build():  # pragma: no cover - needs CUDA
    import triton
    import triton.language as tl

    @triton.jit
    def gemv1_kernel(
        x_ptr,
        w_ptr,
        s_ptr,
        z_ptr,
        b_ptr,
        y_ptr,
        N,
        n_words,
        n_tiles_in,
        one_bits,
        L1: tl.constexpr,
        L2: tl.constexpr,
        C: tl.constexpr,
        ROWS: tl.constexpr,
        BLOCK_W: tl.constexpr,
        X_PAIRS: tl.constexpr,
        X_BF16: tl.constexpr,
        EVEN: tl.constexpr,
        HAS_BIAS: tl.constexpr,
    ):
        # One token. The per-weight work is (ROWS, BLOCK_W) in the layout of the code load; alpha is read per row
        # (repeats hit L1), so it needs no layout conversion. The zero-point term is per tile row and word, so it is
        # accumulated once per tile row: (ROWS // L2, BLOCK_W).
        # Decoding: byte p of a word holds nibbles 2p (low) and 2p + 1 (high). One shift puts the high nibble at
        # mantissa bits 19..22 and the low one at 15..18; masking each and or-ing 1.0f (``one_bits``, a runtime value
        # so that the compiler keeps and + or as one instruction) gives f_hi = 1 + q / 16 and f_lo = 1 + q / 256.
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        groups = tl.program_id(0) * (ROWS // L2) + tl.arange(0, ROWS // L2)
        row_ok = rows < N
        g_ok = groups < N // L2
        w_rows = w_ptr + rows.to(tl.int64)[:, None] * n_words
        s_rows = (rows // L2).to(tl.int64)[:, None] * n_tiles_in
        g_rows = groups.to(tl.int64)[:, None] * n_tiles_in
        acc = tl.zeros((ROWS, BLOCK_W), dtype=tl.float32)
        acc_zero = tl.zeros((ROWS // L2, BLOCK_W), dtype=tl.float32)
        for w0 in range(0, n_words, BLOCK_W):
            words = w0 + tl.arange(0, BLOCK_W)
            if C == L1:
                tiles = words  # keeps the compiler's contiguity (words * C // L1 would lose it)
            else:
                tiles = words // (L1 // C)
            w_ok = words < n_words
            if EVEN:
                packed = tl.load(w_rows + words[None, :])
                alpha = tl.load(s_ptr + s_rows + tiles[None, :])
                g_alpha = tl.load(s_ptr + g_rows + tiles[None, :])
                g_beta = tl.load(z_ptr + g_rows + tiles[None, :])
            else:
                ok = row_ok[:, None] & w_ok[None, :]
                g_ok2 = g_ok[:, None] & w_ok[None, :]
                packed = tl.load(w_rows + words[None, :], mask=ok, other=0)
                alpha = tl.load(s_ptr + s_rows + tiles[None, :], mask=ok, other=0.0)
                g_alpha = tl.load(s_ptr + g_rows + tiles[None, :], mask=g_ok2, other=0.0)
                g_beta = tl.load(z_ptr + g_rows + tiles[None, :], mask=g_ok2, other=0.0)
            codes = packed.to(tl.int32)
            dots_hi = tl.zeros((ROWS, BLOCK_W), dtype=tl.float32)
            dots_lo = tl.zeros((ROWS, BLOCK_W), dtype=tl.float32)
            sum_hi = tl.zeros((BLOCK_W,), dtype=tl.float32)
            sum_lo = tl.zeros((BLOCK_W,), dtype=tl.float32)
            for p in tl.static_range(C // 2):
                if 8 * p <= 15:
                    shifted = codes << (15 - 8 * p)
                else:
                    shifted = codes >> (8 * p - 15)
                f_hi = ((shifted & 0x00780000) | one_bits).to(tl.float32, bitcast=True)
                f_lo = ((shifted & 0x00078000) | one_bits).to(tl.float32, bitcast=True)
                if X_PAIRS:  # 16-bit x read as int32: inputs 2p and 2p + 1 of the word in one load
                    if EVEN:
                        pair = tl.load(x_ptr + words * (C // 2) + p)
                    else:
                        pair = tl.load(x_ptr + words * (C // 2) + p, mask=w_ok, other=0)
                    if X_BF16:
                        x_lo = (pair << 16).to(tl.float32, bitcast=True)
                        x_hi = (pair & -65536).to(tl.float32, bitcast=True)
                    else:
                        x_lo = pair.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
                        x_hi = (pair >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
                else:
                    if EVEN:
                        x_lo = tl.load(x_ptr + words * C + 2 * p)
                        x_hi = tl.load(x_ptr + words * C + 2 * p + 1)
                    else:
                        x_lo = tl.load(x_ptr + words * C + 2 * p, mask=w_ok, other=0.0)
                        x_hi = tl.load(x_ptr + words * C + 2 * p + 1, mask=w_ok, other=0.0)
                    x_lo = x_lo.to(tl.float32)
                    x_hi = x_hi.to(tl.float32)
                dots_hi += x_hi[None, :] * f_hi
                dots_lo += x_lo[None, :] * f_lo
                sum_hi += x_hi
                sum_lo += x_lo
            # sum_i x_i q_i = 16 (dots_hi - sum_hi) + 256 (dots_lo - sum_lo)
            acc += alpha.to(tl.float32) * (dots_hi + 16.0 * dots_lo)
            g_alpha = g_alpha.to(tl.float32)
            zero_coef = g_beta.to(tl.float32) * (sum_hi + sum_lo)[None, :]
            acc_zero += zero_coef - 16.0 * g_alpha * (sum_hi + 16.0 * sum_lo)[None, :]
        zero_term = tl.sum(acc_zero, axis=1)  # (ROWS // L2,): the same for the L2 rows of a tile row
        zero_term = tl.reshape(tl.broadcast_to(zero_term[:, None], (ROWS // L2, L2)), (ROWS,))
        out = 16.0 * tl.sum(acc, axis=1) + zero_term
        if HAS_BIAS:
            out += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + rows, out.to(y_ptr.dtype.element_ty), mask=row_ok)

    return triton, gemv1_kernel


def _launch(
    x: torch.Tensor,
    weight: TileInt4Weight,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    config: dict[str, int],
    traced: bool = False,
) -> torch.Tensor:  # pragma: no cover - needs CUDA
    packed, scale, zero, tile = weight
    l1, l2 = tile
    c = word_nibbles(l1)
    d_in = x.shape[1]
    d_out = packed.shape[0]
    words = packed.view(_WORD_DTYPES[c])  # (D_out, D_in / c): one word per c inputs, same bytes
    n_words = d_in // c
    rows = max(config["rows"], l2)
    block_w = min(config["block_w"], 1 << max(n_words - 1, 0).bit_length())
    y = torch.empty(1, d_out, dtype=out_dtype, device=x.device)
    # 16-bit x read as int32 pairs when 4-byte aligned (torch's allocations are; a view may start mid-pair)
    pairs = x.dtype in (torch.bfloat16, torch.float16) and x.storage_offset() % 2 == 0
    triton, kernel = _build()
    if traced:
        kernel = torch.library.wrap_triton(kernel)
    kernel[(triton.cdiv(d_out, rows),)](
        x.view(torch.int32) if pairs else x,
        words,
        scale,
        zero,
        bias if bias is not None else y,
        y,
        d_out,
        n_words,
        d_in // l1,
        0x3F800000,  # the bits of 1.0f, passed at run time (see the kernel)
        L1=l1,
        L2=l2,
        C=c,
        ROWS=rows,
        BLOCK_W=block_w,
        X_PAIRS=pairs,
        X_BF16=x.dtype == torch.bfloat16,
        EVEN=n_words % block_w == 0 and d_out % rows == 0,
        HAS_BIAS=bias is not None,
        num_warps=config["num_warps"],
    )
    return y


_run = matmul_op("tile_int4_gemv", _launch, tuple(GEMV_CONFIG))


def tile_int4_gemv(
    x: torch.Tensor,
    weight: TileInt4Weight,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    config: dict[str, int] | None = None,
) -> torch.Tensor:  # pragma: no cover - needs CUDA
    """``x (1, D_in) -> x W~^T + bias`` as ``(1, D_out)`` in ``out_dtype`` (default ``x.dtype``) with the fused kernel.

    Needs CUDA tensors and ``gemv_supported(weight.tile, x.dtype)``. ``config`` overrides keys of :data:`GEMV_CONFIG`.
    Under ``torch.compile`` it is the op ``peft_balanced::tile_int4_gemv`` (inductor launches the kernel itself).
    """
    if x.shape[0] != 1:
        raise ValueError(f"tile_int4_gemv computes one token, got x of shape {tuple(x.shape)}")
    return _run(x, weight, bias, out_dtype or x.dtype, {**GEMV_CONFIG, **(config or {})})
