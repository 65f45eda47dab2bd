"""Split-K small-batch matmul ``y = x W~^T (+ b)`` from the packed 2-D-tile INT4 format (CUDA + Triton; opt-in).

``gemv.py``'s kernels give every program ``ROWS`` output rows and *all* of ``D_in``; for a short, wide layer
(11008 -> 4096) that is few programs, each streaming a long row. Here the grid is
``(cdiv(D_out, ROWS), SPLIT_K)``: program ``(r, k)`` reads ``ROWS`` rows x one ``D_in / SPLIT_K`` slice, so more
programs share the weight stream, and its fp32 partial sums are combined either by ``tl.atomic_add`` into a zeroed
fp32 buffer (``reduce="atomic"``) or stored per slice and summed by torch (``reduce="sum"``, deterministic). Bias and
the one rounding to the output dtype come after the reduction.

Codes are always read as int32 words (8 nibbles, the widest load the format allows per row); a word spans
``8 // l1`` tiles (``l1`` in 2, 4) or lies inside one (``l1`` a multiple of 8). The per-weight arithmetic is
``gemv.py``'s: nibble ``q`` placed in the mantissa of 1.0f reads ``f = 1 + q / 16`` and
``sum_i x_i q_i = 16 (sum_i x_i f_i - sum_i x_i)``, so per tile
``y += 16 alpha (sum x f) + (beta - 16 alpha) (sum x)``.

Nothing routes here by default: ``peft_balanced.settings.set_int4_gemv_kernel("split_k")`` selects it for the
tokens ``TileInt4Linear`` sends to the fused path (``gemv.GEMV_MAX_TOKENS``), until a GPU run shows it faster.
The kernels are written so that they also run under ``TRITON_INTERPRET=1`` (CPU tensors; the tests do that).
"""

from __future__ import annotations

import functools

import torch

from .support import triton_interpreting

__all__ = ["SPLITK_MAX_TOKENS", "choose_split_k", "splitk_config", "splitk_supported", "tile_int4_splitk_gemv"]

SPLITK_MAX_TOKENS = 16  # BLOCK_M rows of products live in registers: beyond this a tensor-core GEMM is the tool

# Per token bucket (next power of two of M): output rows per program, int32 words (8 inputs each) per step, warps.
# NOT measured yet (no GPU time in the session that wrote this): starting points for `int4_linear.py --tune-splitk`.
_CONFIGS: dict[int, dict[str, int]] = {
    1: {"rows": 32, "block_w": 64, "num_warps": 4},
    2: {"rows": 32, "block_w": 32, "num_warps": 4},
    4: {"rows": 16, "block_w": 32, "num_warps": 4},
    8: {"rows": 16, "block_w": 16, "num_warps": 4},
    16: {"rows": 8, "block_w": 16, "num_warps": 4},
}
_DEFAULT_SMS = 132  # H100 / H200; used when no CUDA device can be asked (CPU, the interpreter)


def _bucket(m: int) -> int:
    return min(1 << max(m - 1, 0).bit_length(), max(_CONFIGS))


def splitk_config(m: int) -> dict[str, int]:
    """The block shape used for ``m`` tokens (a copy of the bucket's entry)."""
    return dict(_CONFIGS[_bucket(m)])


def splitk_supported(tile: tuple[int, int], dtype: torch.dtype, in_features: int) -> bool:
    """Whether the split-K kernel handles this layer: ``l1`` in 2, 4 or a multiple of 8 (an int32 word of 8 codes
    never straddles a tile edge mid-group), ``l2`` a power of two, ``D_in % 8 == 0``, activations fp16 / bf16 / fp32.
    """
    l1, l2 = tile
    l1_ok = l1 in (2, 4) or l1 % 8 == 0
    pow2 = l2 > 0 and l2 & (l2 - 1) == 0
    return l1_ok and pow2 and in_features % 8 == 0 and dtype in (torch.float16, torch.bfloat16, torch.float32)


def choose_split_k(d_out: int, n_words: int, rows: int, block_w: int, sms: int | None = None) -> int:
    """Slices of ``D_in`` per output block: enough programs for about 4 per SM, each slice at least ``block_w``
    words. 1 when the output blocks alone already fill the GPU (e.g. 4096 -> 11008 with 32-row blocks)."""
    if sms is None:
        sms = torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else _DEFAULT_SMS
    row_blocks = -(-d_out // rows)
    steps = max(-(-n_words // block_w), 1)
    return max(1, min(4 * sms // row_blocks, steps))


@functools.lru_cache(maxsize=1)
def _build():
    import triton
    import triton.language as tl

    @triton.jit
    def splitk_gemv_kernel(
        x_ptr,
        w_ptr,
        s_ptr,
        z_ptr,
        y_ptr,
        M,
        N,
        n_words,
        n_tiles_in,
        words_per_split,
        stride_xm,
        L1: tl.constexpr,
        L2: tl.constexpr,
        G: tl.constexpr,
        BLOCK_M: tl.constexpr,
        ROWS: tl.constexpr,
        BLOCK_W: tl.constexpr,
        EVEN: tl.constexpr,
        ATOMIC: tl.constexpr,
    ):
        # Program (r, k): rows r*ROWS.., words k*words_per_split.. (a multiple of BLOCK_W). Products are
        # (BLOCK_M, ROWS, BLOCK_W) fp32; a word holds 8 codes in 8 // G groups of G codes that share one tile.
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        ms = tl.arange(0, BLOCK_M)
        row_ok = rows < N
        m_ok = ms < M
        w_rows = w_ptr + rows.to(tl.int64)[:, None] * n_words
        t_rows = (rows // L2).to(tl.int64)[:, None] * n_tiles_in
        x_rows = x_ptr + ms[:, None] * stride_xm
        acc = tl.zeros((BLOCK_M, ROWS, BLOCK_W), dtype=tl.float32)
        start = tl.program_id(1) * words_per_split
        for w0 in range(start, start + words_per_split, BLOCK_W):
            words = w0 + tl.arange(0, BLOCK_W)
            w_ok = words < n_words
            if EVEN:
                codes = tl.load(w_rows + words[None, :])
            else:
                codes = tl.load(w_rows + words[None, :], mask=row_ok[:, None] & w_ok[None, :], other=0)
            for g in tl.static_range(8 // G):
                tiles = (words * 8 + g * G) // L1
                if EVEN:
                    alpha = tl.load(s_ptr + t_rows + tiles[None, :]).to(tl.float32)
                    beta = tl.load(z_ptr + t_rows + tiles[None, :]).to(tl.float32)
                else:
                    ok = row_ok[:, None] & w_ok[None, :]
                    alpha = tl.load(s_ptr + t_rows + tiles[None, :], mask=ok, other=0.0).to(tl.float32)
                    beta = tl.load(z_ptr + t_rows + tiles[None, :], mask=ok, other=0.0).to(tl.float32)
                dots = tl.zeros((BLOCK_M, ROWS, BLOCK_W), dtype=tl.float32)
                pooled = tl.zeros((BLOCK_M, BLOCK_W), dtype=tl.float32)
                for j in tl.static_range(G):
                    n = g * G + j  # nibble n of the word: bits 4n..4n+3 -> mantissa bits 19..22 of 1.0f
                    if 4 * n <= 19:
                        bits = (codes << (19 - 4 * n)) & 0x00780000
                    else:
                        bits = (codes >> (4 * n - 19)) & 0x00780000
                    f = (bits | 0x3F800000).to(tl.float32, bitcast=True)
                    x_at = x_rows + (words * 8 + n)[None, :]
                    if EVEN:
                        xn = tl.load(x_at, mask=m_ok[:, None], other=0.0).to(tl.float32)
                    else:
                        xn = tl.load(x_at, mask=m_ok[:, None] & w_ok[None, :], other=0.0).to(tl.float32)
                    dots += xn[:, None, :] * f[None, :, :]
                    pooled += xn
                a16 = 16.0 * alpha
                acc += a16[None, :, :] * dots + (beta - a16)[None, :, :] * pooled[:, None, :]
        out = tl.sum(acc, axis=2)  # (BLOCK_M, ROWS)
        ok = m_ok[:, None] & row_ok[None, :]
        if ATOMIC:
            tl.atomic_add(y_ptr + ms[:, None] * N + rows[None, :], out, mask=ok)
        else:
            y = y_ptr + tl.program_id(1).to(tl.int64) * M * N + ms[:, None] * N + rows[None, :]
            tl.store(y, out, mask=ok)

    return triton, splitk_gemv_kernel


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def tile_int4_splitk_gemv(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    tile: tuple[int, int],
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    config: dict[str, int] | None = None,
    split_k: int | None = None,
    reduce: str = "atomic",
) -> torch.Tensor:
    """``x (M, D_in) -> x W~^T + bias`` as ``(M, D_out)`` in ``out_dtype`` (default ``x.dtype``), split along K.

    Needs ``M <= SPLITK_MAX_TOKENS`` and ``splitk_supported(tile, x.dtype, D_in)``; CUDA tensors (or CPU tensors under
    ``TRITON_INTERPRET=1``). ``config`` (``rows``, ``block_w``, ``num_warps``, optionally ``split_k``) overrides the
    bucket's block shape, ``split_k`` the :func:`choose_split_k` heuristic; ``reduce`` is ``"atomic"`` or ``"sum"`` (see the module doc).
    """
    m, d_in = x.shape
    d_out = packed.shape[0]
    if not 0 < m <= SPLITK_MAX_TOKENS:
        raise ValueError(f"tile_int4_splitk_gemv: M={m} tokens, expected 1..{SPLITK_MAX_TOKENS}")
    if not splitk_supported(tile, x.dtype, d_in):
        raise ValueError(
            f"tile_int4_splitk_gemv: tile={tile}, dtype={x.dtype}, D_in={d_in} not supported (l1 in 2, 4 or a "
            "multiple of 8, l2 a power of two, D_in % 8 == 0, fp16 / bf16 / fp32 activations)"
        )
    if reduce not in ("atomic", "sum"):
        raise ValueError(f"tile_int4_splitk_gemv: reduce must be 'atomic' or 'sum', got {reduce!r}")
    if not (x.is_cuda or triton_interpreting()):
        raise RuntimeError("tile_int4_splitk_gemv needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
    l1, l2 = tile
    x = x.contiguous()
    words = packed.contiguous().view(torch.int32)  # (D_out, D_in / 8): 8 codes per word, same bytes
    n_words = d_in // 8
    cfg = {**splitk_config(m), **(config or {})}
    rows = max(cfg["rows"], 1)
    block_w = min(cfg["block_w"], 1 << max(n_words - 1, 0).bit_length())
    split_k = split_k or cfg.get("split_k")  # a tuned bucket may fix it
    if split_k is None:
        split_k = 1 if triton_interpreting() and not x.is_cuda else choose_split_k(d_out, n_words, rows, block_w)
    per_split = _cdiv(_cdiv(n_words, max(split_k, 1)), block_w) * block_w  # whole steps per slice
    split_k = _cdiv(n_words, per_split)  # no empty slices
    triton, kernel = _build()
    if reduce == "atomic":
        acc = torch.zeros(m, d_out, dtype=torch.float32, device=x.device)
    else:
        acc = torch.empty(split_k, m, d_out, dtype=torch.float32, device=x.device)
    kernel[(triton.cdiv(d_out, rows), split_k)](
        x,
        words,
        scale.contiguous(),
        zero.contiguous(),
        acc,
        m,
        d_out,
        n_words,
        d_in // l1,
        per_split,
        x.stride(0),
        L1=l1,
        L2=l2,
        G=min(l1, 8),
        BLOCK_M=triton.next_power_of_2(m),
        ROWS=rows,
        BLOCK_W=block_w,
        EVEN=d_out % rows == 0 and n_words % per_split == 0,
        ATOMIC=reduce == "atomic",
        num_warps=cfg["num_warps"],
    )
    y = acc if reduce == "atomic" else acc.sum(0)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype or x.dtype)
