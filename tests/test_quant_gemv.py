"""Fused small-M INT4 matmul (quant/kernels/gemv.py): its math and routing on CPU; the Triton kernel itself on CUDA."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peft_balanced.quant.kernels.gemv as gemv
import peft_balanced.quant.kernels.support as kernels
import peft_balanced.quant.linear as linear_mod
from peft_balanced.quant import TileInt4Linear, dequantize_tiles, quantize_tiles

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
    assert _rel(gemv.gemv_reference(x, packed, scale, zero, tile, bias), expected) < 1e-5


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


def test_use_gemv_routes_only_small_token_counts_on_cuda_with_triton():
    limit = gemv.GEMV_MAX_TOKENS
    assert gemv.use_gemv(1, (4, 8), torch.bfloat16, "cuda", True)
    assert gemv.use_gemv(limit, (4, 8), torch.bfloat16, "cuda", True) is (limit >= 1)
    assert not gemv.use_gemv(limit + 1, (4, 8), torch.bfloat16, "cuda", True)
    assert not gemv.use_gemv(0, (4, 8), torch.bfloat16, "cuda", True)
    assert not gemv.use_gemv(1, (4, 8), torch.bfloat16, "cpu", True)
    assert not gemv.use_gemv(1, (4, 8), torch.bfloat16, "cuda", False)
    assert not gemv.use_gemv(1, (3, 8), torch.bfloat16, "cuda", True)
    assert not gemv.use_gemv(1, (4, 8), torch.bfloat16, "cuda", True, needs_param_grad=True)


def test_disable_env_var_turns_triton_off(monkeypatch):
    monkeypatch.setattr(kernels.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kernels, "_triton_importable", lambda: True)
    monkeypatch.delenv("PEFT_BALANCED_DISABLE_TRITON", raising=False)
    assert kernels.triton_available()
    monkeypatch.setenv("PEFT_BALANCED_DISABLE_TRITON", "1")
    assert not kernels.triton_available()


def test_forward_passes_token_count_dtype_and_device_to_the_routing_rule(monkeypatch):
    layer = TileInt4Linear.from_linear(nn.Linear(128, 64), (4, 8))
    seen = []
    monkeypatch.setattr(linear_mod, "use_gemv", lambda *args: seen.append(args) or False)
    x = torch.randn(2, 3, 128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)
    layer(x[:1, :1])
    layer.zero.requires_grad_(True)
    layer(x)
    assert seen[0] == (6, (4, 8), torch.bfloat16, "cpu", False, False)
    assert seen[1] == (1, (4, 8), torch.float32, "cpu", False, False)
    assert seen[2][-1] is True  # a gradient for zero is wanted: the fused kernel has none


def test_cpu_forward_never_calls_the_fused_kernel(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("fused kernel called on CPU")

    monkeypatch.setattr(linear_mod, "fused_linear", fail)
    monkeypatch.setattr(gemv, "tile_int4_gemv", fail)
    layer = TileInt4Linear.from_linear(nn.Linear(128, 64), (4, 8))
    x = torch.randn(1, 128)
    assert torch.equal(layer(x), F.linear(x, layer.dequantize(), layer.bias))


# ---------------------------------------------------------------- CUDA (skipped on CPU-only machines)


def _needs_triton():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if not kernels.triton_available():
        pytest.skip("needs Triton")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("d_out", "d_in", "tile"), [(1024, 2048, (4, 8)), (200, 300, (4, 8)), (256, 512, (16, 1))])
@pytest.mark.parametrize("tokens", [1, 3, 16])
def test_cuda_fused_kernel_matches_the_dequantized_matmul(d_out, d_in, tile, tokens, dtype):
    _needs_triton()
    packed, scale, zero = (t.cuda() for t in _quantized(d_out, d_in, tile))
    x = torch.randn(tokens, d_in, device="cuda").to(dtype)
    bias = torch.randn(d_out, device="cuda").to(dtype)
    ref = x.double() @ dequantize_tiles(packed, scale, zero, tile, torch.float64).T + bias.double()
    y = gemv.tile_int4_gemv(x, packed, scale, zero, tile, bias)
    assert y.dtype == dtype and bool(torch.isfinite(y).all())
    assert _rel(y, ref) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_cuda_forward_routes_few_tokens_to_the_fused_kernel_with_input_gradient(monkeypatch):
    _needs_triton()
    layer = TileInt4Linear.from_linear(nn.Linear(512, 256, device="cuda", dtype=torch.bfloat16), (4, 8))
    calls = []
    real = gemv.tile_int4_gemv
    monkeypatch.setattr(gemv, "tile_int4_gemv", lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k))
    weight = layer.dequantize(torch.float32)
    limit = gemv.GEMV_MAX_TOKENS
    token_counts = sorted({1, max(limit, 1), max(limit, 1) + 1})
    for tokens in token_counts:
        x = torch.randn(tokens, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        y = layer(x)
        assert _rel(y, x.detach().double() @ weight.double().T + layer.bias.double()) < 1e-2
        y.float().sum().backward()
        expected = torch.ones(tokens, 256, device="cuda") @ weight
        assert _rel(x.grad, expected.double()) < 2e-2
    assert calls == [t for t in token_counts if t <= limit]
    monkeypatch.setenv("PEFT_BALANCED_DISABLE_TRITON", "1")
    layer(torch.randn(1, 512, device="cuda", dtype=torch.bfloat16))
    assert calls == [t for t in token_counts if t <= limit]


@pytest.mark.parametrize("tokens", [1, 16])
def test_cuda_fused_kernel_and_dequantize_handle_fp32_zero_points_with_fp16_scales(tokens):
    _needs_triton()  # the default of quantize_model since zero_dtype exists: fp16 alpha, fp32 beta
    weight = torch.randn(256, 512, generator=torch.Generator().manual_seed(0)) * 0.05
    packed, scale, zero = (t.cuda() for t in quantize_tiles(weight, (4, 8), torch.float16, zero_dtype=torch.float32))
    assert zero.dtype == torch.float32
    reference = dequantize_tiles(packed, scale, zero, (4, 8), torch.float64)
    assert torch.equal(gemv.triton_dequantize_tiles(packed, scale, zero, (4, 8), torch.float32), reference.float())
    x = torch.randn(tokens, 512, device="cuda").to(torch.bfloat16)
    y = gemv.tile_int4_gemv(x, packed, scale, zero, (4, 8), None)
    assert _rel(y, x.double() @ reference.T) < 1e-2
