"""BLoRA's math: parameter count, the anchor against peft's LoRA, exact merge, initialization."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from tiny import LLAMA_TARGETS, tiny_llama
from torch import nn

from peft_balanced import BLoRAConfig
from peft_balanced.ops import add_balanced_adapter, add_expanded, expand, expand_blocks, group_sum, pool


def trainable_parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_pool_averages_consecutive_groups():
    x = torch.arange(12.0).reshape(2, 6)
    assert torch.equal(pool(x, 3), torch.tensor([[1.0, 4.0], [7.0, 10.0]]))


def test_expand_repeats_each_feature_in_place():
    z = torch.tensor([[1.0, 2.0]])
    assert torch.equal(expand(z, 3), torch.tensor([[1.0, 1.0, 1.0, 2.0, 2.0, 2.0]]))


def test_pool_in_a_wider_dtype_equals_casting_first():
    x = torch.randn(3, 7, 64, dtype=torch.bfloat16)
    assert pool(x, 2, dtype=torch.float32).dtype == torch.float32
    assert torch.equal(pool(x, 2, dtype=torch.float32), pool(x.float(), 2))


def test_add_expanded_is_bit_identical_to_adding_the_expansion_and_has_the_same_gradients():
    torch.manual_seed(0)
    base = torch.randn(4, 5, 24, dtype=torch.bfloat16, requires_grad=True)
    z = torch.randn(4, 5, 8, requires_grad=True)  # float32 adapter output, expanded by 3
    fused = add_expanded(base, z, 3)
    reference = base + expand(z, 3).to(base.dtype)
    assert torch.equal(fused, reference)
    grad = torch.randn_like(reference)
    fused_grads = torch.autograd.grad(fused, (base, z), grad)
    reference_grads = torch.autograd.grad(reference, (base, z), grad)
    assert torch.equal(fused_grads[0], reference_grads[0])
    torch.testing.assert_close(fused_grads[1], reference_grads[1], rtol=1e-2, atol=1e-2)  # bf16 vs fp32 group sum


@pytest.mark.parametrize("k_in,k_out", [(1, 1), (2, 2), (4, 2), (8, 1)])
@pytest.mark.parametrize("n_weights", [1, 2])
def test_fused_balanced_adapter_equals_the_unfused_ops_and_their_gradients(k_in, k_out, n_weights):
    torch.manual_seed(0)
    d_in, d_out, rank = 32, 24, 6
    base = torch.randn(2, 5, d_out, dtype=torch.bfloat16, requires_grad=True)
    x = torch.randn(2, 5, d_in, dtype=torch.bfloat16, requires_grad=True)
    shapes = [(d_out // k_out, d_in // k_in)] if n_weights == 1 else [(rank, d_in // k_in), (d_out // k_out, rank)]
    weights = [torch.randn(shape, requires_grad=True) for shape in shapes]
    fused = add_balanced_adapter(base, x, weights, 0.7, k_in, k_out)
    small = pool(x, k_in, dtype=torch.float32)
    for weight in weights:
        small = small @ weight.T
    reference = add_expanded(base, small * 0.7, k_out)
    assert torch.equal(fused, reference)
    grad = torch.randn_like(reference)
    inputs = (base, x, *weights)
    ours, theirs = torch.autograd.grad(fused, inputs, grad), torch.autograd.grad(reference, inputs, grad)
    exact_inputs = [t.detach().double().requires_grad_(True) for t in inputs]
    small = pool(exact_inputs[1], k_in)
    for weight in exact_inputs[2:]:
        small = small @ weight.T
    exact = torch.autograd.grad(exact_inputs[0] + expand(small * 0.7, k_out), exact_inputs, grad.double())
    for mine, unfused, truth in zip(ours, theirs, exact, strict=True):
        # at least as accurate as autograd through the unfused ops (which sums groups in bf16)
        assert (mine.double() - truth).abs().max() <= (unfused.double() - truth).abs().max() * 1.05 + 1e-6


@pytest.mark.parametrize("n_weights", [1, 2])
def test_fused_balanced_adapter_under_autocast_computes_like_linear_and_keeps_fp32_weight_grads(n_weights):
    torch.manual_seed(0)
    d_in, d_out, rank, k = 32, 24, 6, 2
    base = torch.randn(2, 5, d_out, dtype=torch.bfloat16, requires_grad=True)
    x = torch.randn(2, 5, d_in, dtype=torch.bfloat16, requires_grad=True)
    shapes = [(d_out // k, d_in // k)] if n_weights == 1 else [(rank, d_in // k), (d_out // k, rank)]
    weights = [torch.randn(shape, requires_grad=True) for shape in shapes]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = add_balanced_adapter(base, x, weights, 0.7, k, k)
        small = pool(x, k, dtype=torch.float32)
        for weight in weights:
            small = torch.nn.functional.linear(small, weight)  # autocast: bf16 products
        reference = add_expanded(base, small * 0.7, k)
    torch.testing.assert_close(fused, reference, rtol=2e-2, atol=2e-2)
    grad = torch.randn_like(reference)
    inputs = (base, x, *weights)
    ours, theirs = torch.autograd.grad(fused, inputs, grad), torch.autograd.grad(reference, inputs, grad)
    for mine, unfused in zip(ours, theirs, strict=True):
        assert mine.dtype == unfused.dtype
        torch.testing.assert_close(mine.float(), unfused.float(), rtol=5e-2, atol=5e-2 * unfused.abs().max().item())


def test_pool_then_small_matrix_equals_block_expanded_matrix():
    torch.manual_seed(0)
    x, m = torch.randn(5, 12), torch.randn(2, 4)  # D_in = 12 pooled by 3, D_out = 8 expanded by 4
    adapter_path = expand(pool(x, 3) @ m.T, 4)
    dense_path = x @ (expand_blocks(m, 4, 3) / 3).T
    torch.testing.assert_close(adapter_path, dense_path)


def test_trainable_parameters_equal_lora_at_same_rank():
    lora = get_peft_model(tiny_llama(), LoraConfig(r=8, target_modules=LLAMA_TARGETS))
    for lam in (1, 2, 4, 8):
        blora = get_peft_model(tiny_llama(), BLoRAConfig(r=8, balance_factor=lam, target_modules=LLAMA_TARGETS))
        assert trainable_parameter_count(blora) == trainable_parameter_count(lora)


def test_balance_factor_one_with_same_weights_gives_peft_lora_output(input_ids):
    lora = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS))
    blora = get_peft_model(
        tiny_llama(), BLoRAConfig(r=4, balance_factor=1, lora_alpha=8, target_modules=LLAMA_TARGETS)
    )
    generator = torch.Generator().manual_seed(3)
    lora_modules = dict(lora.named_modules())
    for name, module in blora.named_modules():
        if hasattr(module, "bal_A"):
            twin = lora_modules[name]
            module.bal_A["default"].weight.data = torch.randn(twin.lora_A["default"].weight.shape, generator=generator)
            module.bal_B["default"].weight.data = torch.randn(twin.lora_B["default"].weight.shape, generator=generator)
            twin.lora_A["default"].weight.data.copy_(module.bal_A["default"].weight.data)
            twin.lora_B["default"].weight.data.copy_(module.bal_B["default"].weight.data)
    with torch.no_grad():
        torch.testing.assert_close(blora(input_ids).logits, lora(input_ids).logits, rtol=0, atol=1e-5)


def test_output_unchanged_at_initialization(model, input_ids):
    with torch.no_grad():
        reference = model(input_ids).logits
        adapted = get_peft_model(model, BLoRAConfig(r=4, balance_factor=2, target_modules="all-linear"))
        torch.testing.assert_close(adapted(input_ids).logits, reference, rtol=0, atol=0)


def test_output_changes_with_random_initialization(model, input_ids):
    with torch.no_grad():
        reference = model(input_ids).logits.clone()
        config = BLoRAConfig(r=4, balance_factor=2, target_modules="all-linear", init_weights=False)
        adapted = get_peft_model(model, config)
        assert (adapted(input_ids).logits - reference).abs().max() > 1e-3


class OneLinear(nn.Module):
    def __init__(self, d_in: int, d_out: int, bias: bool):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


@settings(max_examples=200, deadline=None)
@given(
    lam=st.sampled_from([1, 2, 3, 4, 8]),
    r=st.integers(1, 6),
    in_blocks=st.integers(1, 6),
    out_blocks=st.integers(1, 6),
    bias=st.booleans(),
    lead_shape=st.sampled_from([(5,), (2, 3)]),
    seed=st.integers(0, 2**16),
)
def test_merged_forward_equals_unmerged_forward(lam, r, in_blocks, out_blocks, bias, lead_shape, seed):
    torch.manual_seed(seed)
    model = OneLinear(lam * in_blocks, lam * out_blocks, bias)
    config = BLoRAConfig(r=r, balance_factor=lam, lora_alpha=2 * r, target_modules=["proj"], init_weights=False)
    adapted = get_peft_model(model, config)
    x = torch.randn(*lead_shape, lam * in_blocks)
    with torch.no_grad():
        unmerged = adapted(x)
        adapted.merge_adapter()
        merged = adapted(x)
    assert merged.shape == (*lead_shape, lam * out_blocks)
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)


def test_delta_weight_is_constant_on_balance_factor_tiles():
    torch.manual_seed(0)
    adapted = get_peft_model(
        OneLinear(8, 12, bias=False), BLoRAConfig(r=2, balance_factor=4, target_modules=["proj"], init_weights=False)
    )
    delta = adapted.base_model.model.proj.get_delta_weight("default")
    tiles = delta.reshape(3, 4, 2, 4)
    assert torch.equal(tiles, tiles[:, :1, :, :1].expand_as(tiles))


def test_blora_layer_output_comes_from_one_fused_adapter_node():
    model = get_peft_model(
        tiny_llama(), BLoRAConfig(r=4, balance_factor=2, target_modules=["q_proj"], init_weights=False)
    )
    layer = next(m for m in model.modules() if hasattr(m, "bal_A"))
    x = torch.randn(2, 3, layer.in_features, requires_grad=True)
    assert "BalancedAdd" in type(layer(x).grad_fn).__name__


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dtype", [None, torch.float32, torch.bfloat16])
def test_pool_and_group_sum_by_two_equal_the_reductions_bit_for_bit(x_dtype, dtype):
    torch.manual_seed(0)
    x = (torch.randn(3, 5, 256) * torch.logspace(-3, 3, 256)).to(x_dtype)
    reference_sum = x.unflatten(-1, (-1, 2)).sum(dim=-1, dtype=dtype)
    reference_mean = x.unflatten(-1, (-1, 2)).mean(dim=-1, dtype=dtype)
    assert group_sum(x, 2, dtype).dtype == reference_sum.dtype
    assert torch.equal(group_sum(x, 2, dtype), reference_sum)
    assert torch.equal(pool(x, 2, dtype), reference_mean)


def test_group_sum_refuses_a_width_that_is_not_a_multiple_of_the_factor():
    with pytest.raises(ValueError, match="Cannot sum 6 features by 4"):
        group_sum(torch.ones(2, 6), 4)
