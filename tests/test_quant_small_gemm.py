"""Fused dequantize-GEMM for a few dozen tokens (quant/kernels/small_gemm.py) and the setting that routes to it.

Kernel checks run the real Triton kernel: under the Triton interpreter on CPU (small shapes; skipped unless Triton is
importable and ``TRITON_INTERPRET=1`` is set) and compiled on CUDA (Llama-2-7B shapes; skipped without a GPU).
The kernel rounds each decoded weight block to the activation dtype (as ``dequantize_tiles`` + ``F.linear`` do), so
its float32 result is compared with ``x @ round(W~)^T`` in float64, and its dtype result with the exact product.
"""

import os

import pytest
import torch
from torch import nn

import peft_balanced.quant.kernels.small_gemm as small_gemm
import peft_balanced.quant.kernels.support as support
from peft_balanced import settings
from peft_balanced.quant import TileInt4Linear, dequantize_tiles, quantize_tiles

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
    packed, scale, zero = _quantized(d_out, d_in, tile, device, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(tokens, d_in, generator=gen).to(device=device, dtype=dtype)
    bias = torch.randn(d_out, generator=gen).to(device=device, dtype=dtype)
    weight32 = dequantize_tiles(packed, scale, zero, tile, torch.float32)
    ref_rounded = x.double() @ _rounded(weight32, dtype).double().T + bias.double()
    ref = x.double() @ dequantize_tiles(packed, scale, zero, tile, torch.float64).T + bias.double()
    y32 = small_gemm.tile_int4_small_gemm(x, packed, scale, zero, tile, bias, torch.float32, config)
    y = small_gemm.tile_int4_small_gemm(x, packed, scale, zero, tile, bias, config=config)
    assert y.dtype == dtype and y.shape == (tokens, d_out) and bool(torch.isfinite(y).all())
    one_rounding = ((y.float() - y32).abs() <= ULP[dtype] * y32.abs() + 1e-6).all()
    return _rel(y32, ref_rounded), bool(one_rounding), _rel(y, ref)


# ---------------------------------------------------------------- CPU: the setting and the routing rule


def test_int4_gemm_is_off_by_default():
    assert settings.get_int4_gemm_max_tokens() == 0
    assert not small_gemm.use_small_gemm(16, (4, 8), torch.bfloat16, 4096, "cuda", True)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "64"])
def test_int4_gemm_max_tokens_rejects_what_is_not_a_count(bad):
    with pytest.raises(ValueError, match="int >= 0"):
        settings.set_int4_gemm_max_tokens(bad)


def test_use_small_gemm_routes_up_to_the_set_token_count_on_cuda_with_triton(monkeypatch):
    monkeypatch.setattr(settings, "_int4_gemm_max_tokens", 64)
    assert small_gemm.use_small_gemm(64, (4, 8), torch.bfloat16, 4096, "cuda", True)
    assert not small_gemm.use_small_gemm(65, (4, 8), torch.bfloat16, 4096, "cuda", True)
    assert not small_gemm.use_small_gemm(16, (4, 8), torch.bfloat16, 4096, "cpu", True)
    assert not small_gemm.use_small_gemm(16, (4, 8), torch.bfloat16, 4096, "cuda", False)
    assert not small_gemm.use_small_gemm(16, (4, 8), torch.float32, 4096, "cuda", True)  # tl.dot operands
    assert not small_gemm.use_small_gemm(16, (6, 8), torch.bfloat16, 4104, "cuda", True)  # l1 not a power of two
    assert not small_gemm.use_small_gemm(16, (4, 8), torch.bfloat16, 4096, "cuda", True, needs_param_grad=True)


def test_small_gemm_rejects_unsupported_layers_with_the_rule():
    packed, scale, zero = _quantized(64, 256, (4, 8))
    with pytest.raises(ValueError, match=r"dtype=torch.float32.*fp16 / bf16 activations"):
        small_gemm.tile_int4_small_gemm(torch.randn(16, 256), packed, scale, zero, (4, 8))


# ---------------------------------------------------------------- the Triton interpreter on CPU


@pytest.fixture
def interpreted():
    pytest.importorskip("triton")
    if not INTERPRETING:  # triton.language is decorated once, when triton is imported
        pytest.skip("run with TRITON_INTERPRET=1 set before start (the Triton interpreter, CPU tensors)")


@pytest.mark.slow  # the interpreter runs the kernel in numpy
@pytest.mark.parametrize("tile", [(4, 8), (8, 8)])
@pytest.mark.parametrize(("d_out", "d_in"), [(512, 256), (256, 512), (104, 264)])
@pytest.mark.parametrize("tokens", [1, 9, 16, 33, 64])
def test_interpreted_small_gemm_matches_the_dequantized_matmul(interpreted, d_out, d_in, tile, tokens):
    dtype = torch.bfloat16 if tokens % 2 else torch.float16
    err32, one_rounding, err = _check(d_out, d_in, tile, tokens, dtype, "cpu", seed=tokens)
    assert err32 < 1e-5 and one_rounding
    if dtype == torch.float16:  # the interpreter truncates to bf16: its error vs the exact product is biased
        assert err < 2e-2


@pytest.mark.slow
@pytest.mark.parametrize("split_k", [2, 3])
def test_interpreted_small_gemm_with_split_k_gives_the_same_result(interpreted, split_k):
    err32, one_rounding, _ = _check(104, 264, (4, 8), 33, torch.bfloat16, "cpu", 5, {"split_k": split_k})
    assert err32 < 1e-5 and one_rounding


# ---------------------------------------------------------------- CUDA (skipped on CPU-only machines)


def _needs_cuda():
    if not (torch.cuda.is_available() and support.triton_available()):
        pytest.skip("needs CUDA and Triton")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tile", [(4, 8), (8, 8)])
@pytest.mark.parametrize(("d_out", "d_in"), [(11008, 4096), (4096, 11008), (11000, 4104), (200, 296)])
@pytest.mark.parametrize("tokens", [9, 16, 64])
def test_cuda_small_gemm_matches_the_dequantized_matmul(d_out, d_in, tile, tokens, dtype):
    _needs_cuda()
    err32, one_rounding, err = _check(d_out, d_in, tile, tokens, dtype, "cuda", seed=d_out + tokens)
    assert err32 < 1e-5 and one_rounding
    assert err < 2e-2


def test_cuda_forward_routes_to_the_small_gemm_when_set_with_input_gradient(monkeypatch):
    _needs_cuda()
    layer = TileInt4Linear.from_linear(nn.Linear(512, 256, device="cuda", dtype=torch.bfloat16), (4, 8))
    calls = []
    real = small_gemm.tile_int4_small_gemm
    monkeypatch.setattr(
        small_gemm, "tile_int4_small_gemm", lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k)
    )
    monkeypatch.setattr(settings, "_int4_gemm_max_tokens", 32)
    weight = layer.dequantize(torch.float32)
    for tokens in (16, 32, 33):
        x = torch.randn(tokens, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        y = layer(x)
        assert _rel(y, x.detach().double() @ weight.double().T + layer.bias.double()) < 2e-2
        y.float().sum().backward()
        assert _rel(x.grad, (torch.ones(tokens, 256, device="cuda") @ weight).double()) < 2e-2
    assert calls == [16, 32]
