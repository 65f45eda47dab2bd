"""Which kernel a TileInt4Linear forward runs (quant/kernels/route.py): the rule on CPU, the measured choice on CUDA."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peft_balanced.quant.kernels.route as route
import peft_balanced.quant.kernels.support as support
from peft_balanced import settings
from peft_balanced.quant import TileInt4Linear

SMALL = route.Route("small_gemm", (("block_n", 64),))


@pytest.fixture
def no_device(monkeypatch):
    """The rule without a GPU: a fixed multiprocessor count, an empty cache, and measuring forbidden."""
    monkeypatch.setattr(route, "_sms", lambda: 132)
    monkeypatch.setattr(route, "_TUNED", {})

    def measured(*args):
        raise AssertionError("measured")

    monkeypatch.setattr(route, "_tune", measured)


def test_default_route_is_the_gemv_for_one_token_the_small_gemm_up_to_16_and_dequantize_above(no_device):
    assert route.default_route(1, 4096, 11008, (4, 8), torch.bfloat16) == route.Route("gemv")
    for tokens in (2, 9, 16):
        assert route.default_route(tokens, 4096, 11008, (4, 8), torch.bfloat16).kernel == "small_gemm"
    assert route.default_route(17, 4096, 11008, (4, 8), torch.bfloat16).kernel == "dequantize"
    assert route.default_route(8, 4096, 11008, (4, 8), torch.float32).kernel == "dequantize"  # tl.dot: 16-bit
    assert route.default_route(1, 4096, 4104, (3, 8), torch.bfloat16).kernel == "dequantize"  # odd l1


def test_the_small_gemm_splits_d_in_only_when_its_output_blocks_leave_multiprocessors_idle():
    assert route._split_for(11008, 4096, 32, 256, 132) == 1  # 344 blocks
    assert route._split_for(4096, 11008, 32, 256, 132) == 3  # 128 blocks: 264 / 128 rounded up
    assert route._split_for(256, 512, 32, 256, 132) == 1  # one step of D_in per slice at least twice
    assert route._split_for(64, 1 << 20, 64, 128, 132) == 8  # at most 8 slices


def test_choose_route_uses_the_measured_route_for_every_token_count_of_its_bucket(no_device, monkeypatch):
    monkeypatch.setitem(route._TUNED, (4096, 11008, (4, 8), "bfloat16", 8), SMALL)
    for tokens in (5, 6, 7, 8):
        assert route.choose_route(tokens, 4096, 11008, (4, 8), torch.bfloat16) == SMALL
    monkeypatch.setattr(settings, "_int4_autotune", False)
    assert route.choose_route(9, 4096, 11008, (4, 8), torch.bfloat16) != SMALL  # another bucket
    assert route.choose_route(8, 4096, 11008, (4, 8), torch.float16) != SMALL  # another dtype


def test_choose_route_never_measures_when_autotune_is_off(no_device, monkeypatch):
    monkeypatch.setattr(settings, "_int4_autotune", False)
    assert route.choose_route(1, 4096, 11008, (4, 8), torch.bfloat16) == route.Route("gemv")


def test_choose_route_never_measures_above_the_small_gemm_range(no_device):
    assert route.choose_route(17, 4096, 11008, (4, 8), torch.bfloat16) == route.Route("dequantize")


def test_choose_route_traces_into_one_graph_and_never_measures_under_compile(no_device, monkeypatch):
    monkeypatch.setitem(route._TUNED, (256, 512, (4, 8), "bfloat16", 2), SMALL)

    def scaled(x):
        chosen = route.choose_route(x.shape[0], 256, 512, (4, 8), x.dtype)
        return x * (2 if chosen.kernel == "small_gemm" else 3)

    compiled = torch.compile(scaled, fullgraph=True, dynamic=False)
    x = torch.ones(2, 4, dtype=torch.bfloat16)
    assert torch.equal(compiled(x), 2 * x)  # the measured route
    assert torch.equal(compiled(torch.ones(1, 4, dtype=torch.bfloat16)), 3 * torch.ones(1, 4))  # default: gemv


@pytest.mark.parametrize("bad", [1, "yes", None])
def test_set_int4_autotune_rejects_what_is_not_a_bool(bad):
    with pytest.raises(ValueError, match="True or False"):
        settings.set_int4_autotune(bad)


def test_cpu_forward_never_asks_for_a_kernel(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a Triton route asked for on CPU")

    monkeypatch.setattr(route, "choose_route", fail)
    layer = TileInt4Linear.from_linear(nn.Linear(128, 64), (4, 8))
    x = torch.randn(1, 128)
    assert torch.equal(layer(x), F.linear(x, layer.dequantize(), layer.bias))


# ---------------------------------------------------------------- CUDA (skipped on CPU-only machines)


def _needs_triton():
    if not (torch.cuda.is_available() and support.triton_available()):
        pytest.skip("needs CUDA and Triton")


def _rel(y, ref):
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("tokens", [1, 3, 16, 17])
def test_cuda_forward_runs_the_measured_route_with_input_gradient(tokens, monkeypatch):
    _needs_triton()
    monkeypatch.setattr(route, "_TUNED", {})
    layer = TileInt4Linear.from_linear(nn.Linear(512, 256, device="cuda", dtype=torch.bfloat16), (4, 8))
    weight = layer.dequantize(torch.float32)
    x = torch.randn(tokens, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    assert _rel(y, x.detach().double() @ weight.double().T + layer.bias.double()) < 1e-2
    y.float().sum().backward()
    assert _rel(x.grad, (torch.ones(tokens, 256, device="cuda") @ weight).double()) < 2e-2
    tuned = route.tuned_routes()
    assert list(tuned) == ([] if tokens > 16 else [(256, 512, (4, 8), "bfloat16", route.bucket(tokens))])


def test_cuda_tune_routes_measures_each_shape_once(monkeypatch):
    _needs_triton()
    monkeypatch.setattr(route, "_TUNED", {})
    model = nn.Sequential(
        *(TileInt4Linear.from_linear(nn.Linear(512, 512, device="cuda", dtype=torch.bfloat16)) for _ in range(3))
    )
    tuned = route.tune_routes(model, tokens=(1, 4))
    assert sorted(tuned) == [(512, 512, (4, 8), "bfloat16", 1), (512, 512, (4, 8), "bfloat16", 4)]


def _bf16_layer_and_input(d_out, tokens):
    _needs_triton()
    layer = TileInt4Linear.from_linear(nn.Linear(1024, d_out, device="cuda", dtype=torch.bfloat16), (4, 8))
    return layer, torch.randn(tokens, 1024, device="cuda", dtype=torch.bfloat16)


@pytest.mark.parametrize("tokens", [1, 8])
def test_cuda_compiled_forward_has_no_graph_break_and_equals_eager(tokens):
    layer, x = _bf16_layer_and_input(512, tokens)
    with torch.no_grad():
        eager = layer(x)  # measures the route first
        compiled = torch.compile(layer, fullgraph=True, dynamic=False)(x)
    assert torch.equal(compiled, eager)


@pytest.mark.parametrize("tokens", [1, 8])
def test_cuda_graph_replay_equals_the_eager_call(tokens):
    layer, x = _bf16_layer_and_input(4096, tokens)
    with torch.no_grad():
        eager = layer(x)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer(x)
        for _ in range(3):
            graph.replay()
            assert torch.equal(out, eager)
