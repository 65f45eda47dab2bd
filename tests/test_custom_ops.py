"""The quantized layers' kernels as torch.library custom ops: eager values bit-identical to the autograd.Functions
and references, valid fake / autograd registrations (``opcheck``); the fused balanced add, which dynamo traces,
bit-identical to the fused add as it was first written (2518e54)."""

import bitsandbytes as bnb
import pytest
import torch
from test_quant_nf4 import nf4_layer

from peft_balanced import ops
from peft_balanced.backends import nf4
from peft_balanced.quant.kernels import support

pytestmark = pytest.mark.skipif(not support.TRITON_OPS, reason="torch.library.triton_op needs torch >= 2.6")


class _BalancedAddAsOf2518e54(torch.autograd.Function):
    """The fused balanced add exactly as it was before the custom op (main 2518e54): the reference of these tests."""

    @staticmethod
    def forward(ctx, base, x, scaling, k_in, k_out, *weights):
        device_type = x.device.type
        compute_dtype = weights[0].dtype
        if torch.is_autocast_enabled(device_type):
            compute_dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            cast = [weight.to(compute_dtype) for weight in weights]
            pooled = ops.pool(x, k_in, dtype=compute_dtype)
            hidden = [pooled]
            for weight in cast:
                hidden.append(torch.nn.functional.linear(hidden[-1], weight))
            small = hidden.pop() * scaling
            out = ops.add_expanded(base, small, k_out)
        ctx.save_for_backward(*hidden, *cast)
        ctx.scaling, ctx.k_in, ctx.k_out, ctx.x_dtype, ctx.n = scaling, k_in, k_out, x.dtype, len(weights)
        ctx.weight_dtypes = [weight.dtype for weight in weights]
        return out

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        hidden, weights = saved[: ctx.n], saved[ctx.n :]
        grad_small = grad.unflatten(-1, (-1, ctx.k_out)).sum(dim=-1, dtype=weights[-1].dtype) * ctx.scaling
        grad_weights = [None] * ctx.n
        for i in reversed(range(ctx.n)):
            if ctx.needs_input_grad[5 + i]:
                grad_weight = grad_small.flatten(0, -2).T @ hidden[i].flatten(0, -2)
                grad_weights[i] = grad_weight.to(ctx.weight_dtypes[i])
            grad_small = grad_small @ weights[i]
        grad_x = None
        if ctx.needs_input_grad[1]:
            grad_x = ops.expand((grad_small / ctx.k_in).to(ctx.x_dtype), ctx.k_in)
        return grad, grad_x, None, None, None, *grad_weights


def _function(base, x, weights, scaling, k_in, k_out):
    return ops._BalancedAdd.apply(base, x, scaling, k_in, k_out, *weights)


def _reference(base, x, weights, scaling, k_in, k_out):
    return _BalancedAddAsOf2518e54.apply(base, x, scaling, k_in, k_out, *weights)


def _balanced_inputs(dtype, weight_dtype, k_in, k_out, n_weights, seed=0):
    torch.manual_seed(seed)
    d_in, d_out, rank = 32, 24, 6
    base = torch.randn(2, 5, d_out, dtype=dtype, requires_grad=True)
    x = torch.randn(2, 5, d_in, dtype=dtype, requires_grad=True)
    shapes = [(d_out // k_out, d_in // k_in)] if n_weights == 1 else [(rank, d_in // k_in), (d_out // k_out, rank)]
    weights = [torch.randn(shape, dtype=weight_dtype, requires_grad=True) for shape in shapes]
    return base, x, weights


def _forward_backward(add, dtype, weight_dtype, k_in, k_out, n_weights, autocast):
    base, x, weights = _balanced_inputs(dtype, weight_dtype, k_in, k_out, n_weights)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = add(base, x, weights, 0.7, k_in, k_out)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(out.dtype)
    return [out, *torch.autograd.grad(out, (base, x, *weights), grad)]


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("n_weights", [1, 2])
@pytest.mark.parametrize("k_in,k_out", [(1, 1), (2, 2), (4, 1), (1, 3)])
@pytest.mark.parametrize(
    "dtype,weight_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)],
)
def test_balanced_add_is_bit_identical_to_the_fused_add_of_2518e54_forward_and_backward(
    dtype, weight_dtype, k_in, k_out, n_weights, autocast
):
    case = (dtype, weight_dtype, k_in, k_out, n_weights, autocast)
    reference = _forward_backward(_reference, *case)
    results = _forward_backward(_function, *case)
    for got, want in zip(results, reference, strict=True):
        assert got.dtype == want.dtype
        assert torch.equal(got, want)


def test_balanced_add_under_compile_is_one_graph_of_traced_torch_ops():
    base, x, weights = _balanced_inputs(torch.float32, torch.float32, 2, 2, 2)
    explanation = torch._dynamo.explain(ops.add_balanced_adapter)(base, x, weights, 0.5, 2, 2)
    assert explanation.graph_break_count == 0
    assert "peft_balanced" not in explanation.graphs[0].code  # no opaque op: inductor sees the math


def _nf4_traced(layer, x, bias):
    """:class:`nf4._NF4LinearTraced` (what ``nf4_linear`` runs under compile), called eagerly."""
    code, absmax, absmax2, code2, offset, *sizes = nf4._state_args(layer.weight.quant_state)
    return nf4._NF4LinearTraced.apply(x, layer.weight.data, code, absmax, absmax2, code2, offset, bias, *sizes)


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_linear_for_compile_is_bit_identical_to_the_eager_function_forward_and_backward(nested, bias, dtype):
    layer = nf4_layer(compress=nested, bias=bias, dtype=dtype)
    assert isinstance(layer, bnb.nn.Linear4bit)
    bias_param = torch.nn.Parameter(layer.bias.detach().clone()) if bias else None
    x = torch.randn(3, 7, 256, dtype=dtype, requires_grad=True)
    inputs = [x] + ([bias_param] if bias else [])
    ours = _nf4_traced(layer, x, bias_param)
    theirs = nf4._NF4Linear.apply(x, layer.weight.data, layer.weight.quant_state, bias_param)
    grad = torch.randn_like(ours)
    assert torch.equal(ours, theirs)
    ours_grads, theirs_grads = torch.autograd.grad(ours, inputs, grad), torch.autograd.grad(theirs, inputs, grad)
    for got, want in zip(ours_grads, theirs_grads, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("nested", [True, False])
def test_nf4_dequantize_op_passes_opcheck(nested):
    layer = nf4_layer(compress=nested, bias=True, dtype=torch.float32)
    args = (layer.weight.data, *nf4._state_args(layer.weight.quant_state))
    torch.library.opcheck(torch.ops.peft_balanced.nf4_dequantize.default, args)


def test_nf4_dequantize_op_equals_the_reference():
    layer = nf4_layer()
    state = layer.weight.quant_state
    args = (layer.weight.data, *nf4._state_args(state))
    assert torch.equal(torch.ops.peft_balanced.nf4_dequantize(*args), nf4.nf4_dequantize_reference(*args[:1], state))


def test_nf4_linear_under_compile_is_one_graph_with_only_the_dequantize_opaque():
    layer = nf4_layer(dtype=torch.float32)
    x = torch.randn(3, 7, 256, requires_grad=True)
    explanation = torch._dynamo.explain(nf4.nf4_linear)(layer, x)
    assert explanation.graph_break_count == 0
    code = explanation.graphs[0].code
    assert "higher_order.autograd_function_apply(" in code
    assert "peft_balanced.nf4_linear" not in code


def _tile_int4_args(tile=(4, 8), dtype=torch.bfloat16):
    from peft_balanced.quant.tile_int4 import quantize_tiles

    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    packed, scale, zero = quantize_tiles(weight, tile)
    return packed, scale, zero, tile[0], tile[1], dtype


def test_tile_int4_dequantize_op_equals_the_reference():
    from peft_balanced.quant.tile_int4 import dequantize_tiles

    packed, scale, zero, l1, l2, dtype = _tile_int4_args()
    expected = dequantize_tiles(packed, scale, zero, (l1, l2), dtype)
    assert torch.equal(torch.ops.peft_balanced.tile_int4_dequantize(packed, scale, zero, l1, l2, dtype), expected)


def test_tile_int4_dequantize_op_passes_opcheck():
    torch.library.opcheck(torch.ops.peft_balanced.tile_int4_dequantize.default, _tile_int4_args())
