"""Fused one-token INT4 matmul (quant/kernels/gemv.py): its math on CPU; the Triton kernel under the interpreter and
on CUDA."""

import os

import pytest
import torch

import peft_balanced.quant.kernels.gemv as gemv
import peft_balanced.quant.kernels.support as kernels
from peft_balanced.quant import TileInt4Weight, dequantize_tiles, quantize_tiles
from peft_balanced.quant.kernels.int4 import triton_dequantize_tiles

TILES = [(4, 8), (8, 8), (2, 2), (16, 1), (8, 4)]


def _quantized(d_out, d_in, tile, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(d_out, d_in, generator=gen) * 0.05
    weight[3] += 1.0  # some tiles far from zero: the zero-point term matters
    return quantize_tiles(weight, tile, torch.float16)


def _rel(y, ref):
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


# ---------------------------------------------------------------- CPU: the decomposition and the routing rule


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("tokens", [1, 5, 16])
def test_reference_decomposition_equals_the_dequantized_matmul(tile, tokens):
    packed, scale, zero = _quantized(64, 128, tile)
    x = torch.randn(tokens, 128, generator=torch.Generator().manual_seed(1))
    bias = torch.randn(64)
    expected = x.double() @ dequantize_tiles(packed, scale, zero, tile, torch.float64).T + bias.double()
    assert _rel(gemv.gemv_reference(x, TileInt4Weight(packed, scale, zero, tile), bias), expected) < 1e-5


@pytest.mark.parametrize(("l1", "nibbles"), [(1, 0), (2, 2), (3, 0), (4, 4), (6, 2), (8, 8), (16, 8), (24, 8)])
def test_word_nibbles_is_the_largest_word_inside_a_tile(l1, nibbles):
    assert gemv.word_nibbles(l1) == nibbles


@pytest.mark.parametrize(
    ("tile", "dtype", "supported"),
    [
        ((4, 8), torch.bfloat16, True),
        ((4, 8), torch.float16, True),
        ((4, 8), torch.float32, True),
        ((4, 8), torch.float64, False),
        ((3, 8), torch.bfloat16, False),  # odd l1: a byte would hold two tiles
        ((4, 6), torch.bfloat16, False),  # l2 not a power of two
        ((4, 128), torch.bfloat16, False),
        ((16, 1), torch.bfloat16, True),
    ],
)
def test_gemv_supported(tile, dtype, supported):
    assert gemv.gemv_supported(tile, dtype) is supported


def test_disable_env_var_turns_triton_off(monkeypatch):
    monkeypatch.setattr(kernels.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kernels, "_triton_importable", lambda: True)
    monkeypatch.delenv("PEFT_BALANCED_DISABLE_TRITON", raising=False)
    assert kernels.triton_available()
    monkeypatch.setenv("PEFT_BALANCED_DISABLE_TRITON", "1")
    assert not kernels.triton_available()


# ---------------------------------------------------------------- the Triton interpreter on CPU


@pytest.mark.slow  # the interpreter runs the kernel in numpy
@pytest.mark.parametrize(
    ("d_out", "d_in", "tile", "dtype"),
    [(64, 256, (4, 8), torch.bfloat16), (72, 320, (8, 8), torch.float16), (64, 256, (16, 1), torch.float32)],
)
def test_interpreted_gemv_matches_the_dequantized_matmul(d_out, d_in, tile, dtype):
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("run with TRITON_INTERPRET=1 set before start (the Triton interpreter, CPU tensors)")
    packed, scale, zero = _quantized(d_out, d_in, tile)
    gen = torch.Generator().manual_seed(1)
    x, bias = torch.randn(1, d_in, generator=gen).to(dtype), torch.randn(d_out, generator=gen).to(dtype)
    ref = x.double() @ dequantize_tiles(packed, scale, zero, tile, torch.float64).T + bias.double()
    y = gemv.tile_int4_gemv(x, TileInt4Weight(packed, scale, zero, tile), bias, torch.float32)
    assert _rel(y, ref) < 5e-5  # float32 sums; 1 + q / 16 costs 4 bits of the mantissa


# ---------------------------------------------------------------- CUDA (skipped on CPU-only machines)


def _needs_triton():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if not kernels.triton_available():
        pytest.skip("needs Triton")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("d_out", "d_in", "tile"), [(1024, 2048, (4, 8)), (200, 300, (4, 8)), (256, 512, (16, 1))])
def test_cuda_gemv_matches_the_dequantized_matmul(d_out, d_in, tile, dtype):
    _needs_triton()
    packed, scale, zero = (t.cuda() for t in _quantized(d_out, d_in, tile))
    x = torch.randn(1, d_in, device="cuda").to(dtype)
    bias = torch.randn(d_out, device="cuda").to(dtype)
    ref = x.double() @ dequantize_tiles(packed, scale, zero, tile, torch.float64).T + bias.double()
    y = gemv.tile_int4_gemv(x, TileInt4Weight(packed, scale, zero, tile), bias)
    assert y.dtype == dtype and bool(torch.isfinite(y).all())
    assert _rel(y, ref) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_cuda_gemv_reads_a_bf16_input_that_starts_mid_pair():
    _needs_triton()  # a view at an odd element offset cannot be read as int32 pairs
    packed, scale, zero = (t.cuda() for t in _quantized(256, 512, (4, 8)))
    x = torch.randn(513, device="cuda").to(torch.bfloat16)[1:].view(1, 512)
    ref = x.double() @ dequantize_tiles(packed, scale, zero, (4, 8), torch.float64).T
    assert _rel(gemv.tile_int4_gemv(x, TileInt4Weight(packed, scale, zero, (4, 8))), ref) < 1e-2


def test_cuda_gemv_and_dequantize_handle_fp32_zero_points_with_fp16_scales():
    _needs_triton()  # the default of quantize_model since zero_dtype exists: fp16 alpha, fp32 beta
    weight = torch.randn(256, 512, generator=torch.Generator().manual_seed(0)) * 0.05
    packed, scale, zero = (t.cuda() for t in quantize_tiles(weight, (4, 8), torch.float16, zero_dtype=torch.float32))
    assert zero.dtype == torch.float32
    reference = dequantize_tiles(packed, scale, zero, (4, 8), torch.float64)
    weight = TileInt4Weight(packed, scale, zero, (4, 8))
    assert torch.equal(triton_dequantize_tiles(weight, torch.float32), reference.float())
    x = torch.randn(1, 512, device="cuda").to(torch.bfloat16)
    y = gemv.tile_int4_gemv(x, weight, None)
    assert _rel(y, x.double() @ reference.T) < 1e-2
