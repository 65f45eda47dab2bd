"""Split-K small-batch INT4 matmul (quant/kernels/splitk.py) and the setting that selects it.

The kernel checks run the real Triton kernel: under the Triton interpreter on CPU (small shapes; skipped unless
Triton is importable and ``TRITON_INTERPRET=1`` is set) and compiled on CUDA (the real Llama-2-7B shapes; skipped without a GPU). The reference is
the dequantized weight (``dequantize_tiles``) times ``x`` in float64.
"""

import os

import pytest
import torch

import peft_balanced.quant.kernels.gemv as gemv
import peft_balanced.quant.kernels.splitk as splitk
import peft_balanced.quant.kernels.support as support
from peft_balanced import settings
from peft_balanced.quant import dequantize_tiles, quantize_tiles


def _quantized(d_out, d_in, tile, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(d_out, d_in, generator=gen) * 0.05
    weight[3] += 1.0  # tiles far from zero: the zero-point term matters
    return (t.to(device) for t in quantize_tiles(weight, tile, torch.float16))


def _rel(y, ref):
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


def _check(d_out, d_in, tile, tokens, dtype, device, seed, **kwargs):
    """Run the kernel on fresh random inputs; return (error of the fp32 result, error of the dtype result)."""
    packed, scale, zero = _quantized(d_out, d_in, tile, device, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(tokens, d_in, generator=gen).to(device=device, dtype=dtype)
    bias = torch.randn(d_out, generator=gen).to(device=device, dtype=dtype)
    ref = x.double() @ dequantize_tiles(packed, scale, zero, tile, torch.float64).T + bias.double()
    y32 = splitk.tile_int4_splitk_gemv(x, packed, scale, zero, tile, bias, out_dtype=torch.float32, **kwargs)
    y = splitk.tile_int4_splitk_gemv(x, packed, scale, zero, tile, bias, **kwargs)
    assert y.dtype == dtype and y.shape == (tokens, d_out) and bool(torch.isfinite(y).all())
    return _rel(y32, ref), _rel(y, ref)


# ---------------------------------------------------------------- CPU: the setting and the plain-python parts


def test_int4_gemv_kernel_defaults_to_the_fused_kernel():
    assert settings.get_int4_gemv_kernel() is settings.Int4GemvKernel.FUSED


def test_int4_gemv_kernel_context_sets_and_restores_the_choice():
    with settings.int4_gemv_kernel("split_k") as chosen:
        assert chosen is settings.Int4GemvKernel.SPLIT_K
        assert settings.get_int4_gemv_kernel() is settings.Int4GemvKernel.SPLIT_K
    assert settings.get_int4_gemv_kernel() is settings.Int4GemvKernel.FUSED


def test_unknown_int4_gemv_kernel_is_rejected_with_the_valid_names():
    with pytest.raises(ValueError, match=r"'fused', 'split_k'.*'splitk'"):
        settings.set_int4_gemv_kernel("splitk")


@pytest.mark.parametrize(
    ("tile", "dtype", "d_in", "supported"),
    [
        ((4, 8), torch.bfloat16, 4096, True),
        ((8, 8), torch.float16, 11008, True),
        ((2, 2), torch.float32, 256, True),
        ((16, 1), torch.bfloat16, 256, True),
        ((4, 8), torch.bfloat16, 4100, False),  # D_in not a multiple of 8: no whole int32 words
        ((6, 8), torch.bfloat16, 4104, False),  # an 8-code word would straddle tiles unevenly
        ((4, 6), torch.bfloat16, 4096, False),  # l2 not a power of two
        ((4, 8), torch.float64, 4096, False),
    ],
)
def test_splitk_supported(tile, dtype, d_in, supported):
    assert splitk.splitk_supported(tile, dtype, d_in) is supported


def test_choose_split_k_fills_the_gpu_only_when_output_blocks_are_few():
    assert splitk.choose_split_k(11008, 512, rows=32, block_w=64, sms=132) == 1  # 344 blocks already
    assert splitk.choose_split_k(4096, 1376, rows=32, block_w=64, sms=132) == 4  # 128 blocks x 4 slices
    assert splitk.choose_split_k(64, 16, rows=32, block_w=64, sms=132) == 1  # never more slices than steps


def test_splitk_rejects_too_many_tokens_and_unsupported_layers():
    packed, scale, zero = _quantized(64, 256, (4, 8))
    with pytest.raises(ValueError, match="M=17 tokens, expected 1..16"):
        splitk.tile_int4_splitk_gemv(torch.randn(17, 256), packed, scale, zero, (4, 8))
    with pytest.raises(ValueError, match="dtype=torch.float64"):
        splitk.tile_int4_splitk_gemv(torch.randn(1, 256, dtype=torch.float64), packed, scale, zero, (4, 8))
    with pytest.raises(ValueError, match="reduce must be 'atomic' or 'sum'"):
        splitk.tile_int4_splitk_gemv(torch.randn(1, 256), packed, scale, zero, (4, 8), reduce="tree")


def test_small_batch_gemv_uses_split_k_only_when_chosen_and_supported(monkeypatch):
    calls = []
    monkeypatch.setattr(gemv, "tile_int4_gemv", lambda x, *a, **k: calls.append("fused"))
    monkeypatch.setattr(gemv, "tile_int4_splitk_gemv", lambda x, *a, **k: calls.append("split_k"))
    packed, scale, zero = _quantized(64, 256, (4, 8))
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    gemv.small_batch_gemv(x, packed, scale, zero, (4, 8))
    with settings.int4_gemv_kernel("split_k"):
        gemv.small_batch_gemv(x, packed, scale, zero, (4, 8))
        gemv.small_batch_gemv(x, packed, scale, zero, (6, 8))  # unsupported tile: the fused kernel
    assert calls == ["fused", "split_k", "fused"]


# ---------------------------------------------------------------- the Triton interpreter on CPU


@pytest.fixture
def interpreted():
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":  # triton.language is decorated once, when triton is imported
        pytest.skip("run with TRITON_INTERPRET=1 set before start (the Triton interpreter, CPU tensors)")


INTERPRETER_SHAPES = [(512, 256), (256, 512), (104, 264)]  # (D_out, D_in): both orientations, odd tile multiples


@pytest.mark.slow  # the interpreter runs the kernel in numpy: about 1.5 s per case on one core
@pytest.mark.parametrize("tile", [(4, 8), (8, 8)])
@pytest.mark.parametrize(("d_out", "d_in"), INTERPRETER_SHAPES)
@pytest.mark.parametrize("tokens", [1, 3, 8, 16])
def test_interpreted_splitk_matches_the_dequantized_matmul(interpreted, d_out, d_in, tile, tokens):
    dtype = torch.bfloat16 if tokens % 2 else torch.float16
    # 8-word steps: every shape has several steps, so split_k=3 gives 2 or 3 real slices (some ragged)
    err32, err = _check(d_out, d_in, tile, tokens, dtype, "cpu", seed=tokens, split_k=3, config={"block_w": 8})
    assert err32 < 1e-5  # fp32 accumulation of exact products
    assert err < 1e-2  # one rounding to bf16 / fp16


@pytest.mark.slow
@pytest.mark.parametrize("reduce", ["atomic", "sum"])
@pytest.mark.parametrize("split_k", [1, 2, 5])  # 33 words, 8 per step
def test_interpreted_splitk_gives_the_same_result_for_every_split_and_reduction(interpreted, split_k, reduce):
    # 33 words in 8-word steps: split_k 2 -> slices of 24 + 9 words, 5 -> 8 + 8 + 8 + 8 + 1
    config = {"block_w": 8}
    err32, _ = _check(
        104, 264, (4, 8), 3, torch.bfloat16, "cpu", seed=7, split_k=split_k, reduce=reduce, config=config
    )
    assert err32 < 1e-5


# ---------------------------------------------------------------- CUDA (skipped on CPU-only machines)

CUDA_SHAPES = [(11008, 4096), (4096, 11008), (11000, 4104), (200, 296)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tile", [(4, 8), (8, 8)])
@pytest.mark.parametrize(("d_out", "d_in"), CUDA_SHAPES)
@pytest.mark.parametrize("tokens", [1, 3, 8, 16])
def test_cuda_splitk_matches_the_dequantized_matmul(d_out, d_in, tile, tokens, dtype):
    if not (torch.cuda.is_available() and support.triton_available()):
        pytest.skip("needs CUDA and Triton")
    err32, err = _check(d_out, d_in, tile, tokens, dtype, "cuda", seed=d_out + tokens)
    assert err32 < 1e-5
    assert err < 1e-2


def test_cuda_forward_routes_few_tokens_to_split_k_when_chosen(monkeypatch):
    if not (torch.cuda.is_available() and support.triton_available()):
        pytest.skip("needs CUDA and Triton")
    from torch import nn

    from peft_balanced.quant import TileInt4Linear

    layer = TileInt4Linear.from_linear(nn.Linear(512, 256, device="cuda", dtype=torch.bfloat16), (4, 8))
    calls = []
    real = splitk.tile_int4_splitk_gemv
    monkeypatch.setattr(gemv, "tile_int4_splitk_gemv", lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k))
    weight = layer.dequantize(torch.float32)
    x = torch.randn(3, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with settings.int4_gemv_kernel("split_k"):
        y = layer(x)
        y.float().sum().backward()
    layer(x.detach())  # the default again: the fused kernel
    assert calls == [3]
    assert _rel(y, x.detach().double() @ weight.double().T + layer.bias.double()) < 1e-2
    assert _rel(x.grad, (torch.ones(3, 256, device="cuda") @ weight).double()) < 2e-2
