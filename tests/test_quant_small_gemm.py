"""Fused dequantize-GEMM for up to a few dozen tokens (quant/kernels/small_gemm.py).

Kernel checks run the real Triton kernel: under the Triton interpreter on CPU (small shapes; skipped unless Triton is
importable and ``TRITON_INTERPRET=1`` is set) and compiled on CUDA (Llama-2-7B shapes; skipped without a GPU).
The kernel rounds each decoded weight block to the activation dtype (as ``dequantize_tiles`` + ``F.linear`` do), so
its float32 result is compared with ``x @ round(W~)^T`` in float64, and its dtype result with the exact product.
"""

import os

import pytest
import torch

import peft_balanced.quant.kernels.small_gemm as small_gemm
import peft_balanced.quant.kernels.support as support
from peft_balanced.quant import TileInt4Weight, dequantize_tiles, quantize_tiles

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}  # one unit in the last place, relative


def _quantized(d_out, d_in, tile, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(d_out, d_in, generator=gen) * 0.05
    weight[3] += 1.0  # tiles far from zero: the zero-point term matters
    return (t.to(device) for t in quantize_tiles(weight, tile, torch.float16))


def _rounded(weight32, dtype):
    """``weight32`` rounded to ``dtype`` the way the kernel's ``.to(dtype)`` does: to nearest on a GPU; the
    interpreter (triton 3.9) truncates float32 -> bfloat16."""
    if INTERPRETING and dtype == torch.bfloat16:
        return (weight32.contiguous().view(torch.int32) & -65536).view(torch.float32)
    return weight32.to(dtype).float()


def _rel(y, ref):
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


def _check(d_out, d_in, tile, tokens, dtype, device, seed, config=None):
    """``(float32 result within float32 summation error of x @ round(W~)^T, dtype result = float32 result rounded
    once, relative error of the dtype result against the exact product)``."""
    packed, scale, zero = _quantized(d_out, d_in, tile, device, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(tokens, d_in, generator=gen).to(device=device, dtype=dtype)
    bias = torch.randn(d_out, generator=gen).to(device=device, dtype=dtype)
    rounded = _rounded(dequantize_tiles(packed, scale, zero, tile, torch.float32), dtype).double()
    ref_rounded = x.double() @ rounded.T + bias.double()
    # the products of 16-bit numbers are exact in float32; each of the d_in additions errs by at most 2^-23 relative
    bound = d_in * 2.0**-23 * (x.double().abs() @ rounded.abs().T + bias.double().abs())
    ref = x.double() @ dequantize_tiles(packed, scale, zero, tile, torch.float64).T + bias.double()
    weight = TileInt4Weight(packed, scale, zero, tile)
    y32 = small_gemm.tile_int4_small_gemm(x, weight, bias, torch.float32, config)
    y = small_gemm.tile_int4_small_gemm(x, weight, bias, config=config)
    assert y.dtype == dtype and y.shape == (tokens, d_out) and bool(torch.isfinite(y).all())
    one_rounding = ((y.float() - y32).abs() <= ULP[dtype] * y32.abs() + 1e-6).all()
    summed = ((y32.double() - ref_rounded).abs() <= bound).all()
    return bool(summed), bool(one_rounding), _rel(y, ref)


def _decodes_exactly(d_out, d_in, tile, dtype, device, config=None):
    """One-hot inputs pick single columns, so every output is one decoded weight (no rounding of sums): the kernel's
    float32 result must equal ``dequantize_tiles`` rounded to ``dtype``, bit for bit."""
    packed, scale, zero = _quantized(d_out, d_in, tile, device, seed=7)
    columns = torch.cat([torch.arange(8), torch.randperm(d_in, generator=torch.Generator().manual_seed(0))[:48]])
    columns = torch.cat([columns, torch.arange(d_in - 8, d_in)])  # 64 columns: both ends and random ones
    x = torch.zeros(len(columns), d_in, dtype=dtype)
    x[torch.arange(len(columns)), columns] = 1
    weight = TileInt4Weight(packed, scale, zero, tile)
    y32 = small_gemm.tile_int4_small_gemm(x.to(device), weight, None, torch.float32, config)
    expected = _rounded(dequantize_tiles(packed, scale, zero, tile, torch.float32), dtype)[:, columns.to(device)].T
    return torch.equal(y32, expected)


# ---------------------------------------------------------------- CPU


@pytest.mark.parametrize(
    ("tile", "dtype", "d_in", "supported"),
    [
        ((4, 8), torch.bfloat16, 4096, True),
        ((64, 1), torch.float16, 4096, True),
        ((4, 8), torch.float32, 4096, False),  # tl.dot operands are 16-bit
        ((6, 8), torch.bfloat16, 4104, False),  # l1 not a power of two
        ((1, 8), torch.bfloat16, 4096, False),  # a byte would hold two tiles
        ((128, 1), torch.bfloat16, 4096, False),
        ((4, 8), torch.bfloat16, 4100, False),  # D_in not a multiple of 32
    ],
)
def test_small_gemm_supported(tile, dtype, d_in, supported):
    assert small_gemm.small_gemm_supported(tile, dtype, d_in) is supported


def test_small_gemm_rejects_unsupported_layers_with_the_rule():
    packed, scale, zero = _quantized(64, 256, (4, 8))
    with pytest.raises(ValueError, match=r"dtype=torch.float32.*fp16 / bf16 activations"):
        small_gemm.tile_int4_small_gemm(torch.randn(16, 256), TileInt4Weight(packed, scale, zero, (4, 8)))


# ---------------------------------------------------------------- the Triton interpreter on CPU


@pytest.fixture
def interpreted():
    pytest.importorskip("triton")
    if not INTERPRETING:  # triton.language is decorated once, when triton is imported
        pytest.skip("run with TRITON_INTERPRET=1 set before start (the Triton interpreter, CPU tensors)")


@pytest.mark.slow  # the interpreter runs the kernel in numpy
@pytest.mark.parametrize("tile", [(4, 8), (8, 8)])
@pytest.mark.parametrize(("d_out", "d_in"), [(512, 256), (256, 512), (104, 288)])
@pytest.mark.parametrize("tokens", [1, 9, 16, 33, 64])
def test_interpreted_small_gemm_matches_the_dequantized_matmul(interpreted, d_out, d_in, tile, tokens):
    dtype = torch.bfloat16 if tokens % 2 else torch.float16
    summed, one_rounding, err = _check(d_out, d_in, tile, tokens, dtype, "cpu", seed=tokens)
    assert summed and one_rounding
    if dtype == torch.float16:  # the interpreter truncates to bf16: its error vs the exact product is biased
        assert err < 2e-2


@pytest.mark.slow
@pytest.mark.parametrize("split_k", [2, 3])
def test_interpreted_small_gemm_with_split_k_gives_the_same_result(interpreted, split_k):
    config = {"split_k": split_k, "block_k": 64}
    summed, one_rounding, _ = _check(104, 288, (4, 8), 33, torch.bfloat16, "cpu", 5, config)
    assert summed and one_rounding


@pytest.mark.slow
@pytest.mark.parametrize(
    ("tile", "dtype"), [((4, 8), torch.bfloat16), ((8, 8), torch.float16), ((2, 2), torch.bfloat16)]
)
def test_interpreted_small_gemm_decodes_every_weight_as_dequantize_tiles(interpreted, tile, dtype):
    assert _decodes_exactly(104, 288, tile, dtype, "cpu", {"block_k": 64})


# ---------------------------------------------------------------- CUDA (skipped on CPU-only machines)


def _needs_cuda():
    if not (torch.cuda.is_available() and support.triton_available()):
        pytest.skip("needs CUDA and Triton")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tile", [(4, 8), (8, 8)])
@pytest.mark.parametrize(("d_out", "d_in"), [(11008, 4096), (4096, 11008), (11000, 4128), (200, 288)])
@pytest.mark.parametrize("tokens", [1, 2, 9, 16, 64])
def test_cuda_small_gemm_matches_the_dequantized_matmul(d_out, d_in, tile, tokens, dtype):
    _needs_cuda()
    summed, one_rounding, err = _check(d_out, d_in, tile, tokens, dtype, "cuda", seed=d_out + tokens)
    assert summed and one_rounding
    assert err < 2e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("d_out", "d_in"), [(4096, 11008), (200, 288)])
def test_cuda_small_gemm_decodes_every_weight_as_dequantize_tiles(d_out, d_in, dtype):
    _needs_cuda()
    assert _decodes_exactly(d_out, d_in, (4, 8), dtype, "cuda")


@pytest.mark.parametrize("split_k", [1, 4])
def test_cuda_small_gemm_gives_the_same_bits_on_every_call(split_k):
    _needs_cuda()  # no atomics: the slices' partial sums are added in a fixed order
    packed, scale, zero = _quantized(4096, 11008, (4, 8), "cuda")
    x = torch.randn(4, 11008, device="cuda").to(torch.bfloat16)
    weight = TileInt4Weight(packed, scale, zero, (4, 8))
    first = small_gemm.tile_int4_small_gemm(x, weight, config={"split_k": split_k})
    for _ in range(5):
        again = small_gemm.tile_int4_small_gemm(x, weight, config={"split_k": split_k})
        assert torch.equal(again, first)
