"""QA-BLoRA's math and config: the forward formula, the per-tile update, zero-point merges, bad inputs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import PeftConfig, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType
from tiny import tiny_llama
from torch import nn

from peft_balanced import QABLoRAConfig, QABLoRAModel
from peft_balanced.quant import TileInt4Linear, quantize_model
from peft_balanced.tuners.qablora import QABLoRALinear


class OneLinear(nn.Module):
    def __init__(self, d_in: int, d_out: int, bias: bool = False):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def one_layer(
    tile=(4, 8), d_in=32, d_out=16, bias=False, scale_dtype="float32", zero_dtype=None, seed=0, **config
) -> nn.Module:
    """A single TileInt4Linear ``proj`` with a random (``init_weights=False``) QA-BLoRA adapter; by default its zero
    points are in the scale's dtype."""
    torch.manual_seed(seed)
    model = quantize_model(OneLinear(d_in, d_out, bias), tile=tile, scale_dtype=scale_dtype, zero_dtype=zero_dtype)
    kwargs = dict(tile=tile, lora_alpha=2.0, target_modules=["proj"], init_weights=False)
    kwargs.update(config)
    return get_peft_model(model, QABLoRAConfig(**kwargs))


def layer_of(adapted) -> QABLoRALinear:
    return adapted.base_model.model.proj


def test_qablora_is_registered_with_its_config_tuner_and_prefix():
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.QABLORA] is QABLoRAConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.QABLORA] is QABLoRAModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.QABLORA] == "qab_"


def test_prefix_does_not_overlap_any_other_registered_prefix():
    for peft_type, prefix in PEFT_TYPE_TO_PREFIX_MAPPING.items():
        if peft_type != PeftType.QABLORA:
            assert "qab_" not in prefix and prefix not in "qab_", (peft_type, prefix)


def test_generic_peft_config_from_dict_rebuilds_tile_as_a_tuple():
    config = QABLoRAConfig(tile=[8, 8], target_modules=["q_proj"])
    rebuilt = PeftConfig.from_peft_type(**config.to_dict())
    assert isinstance(rebuilt, QABLoRAConfig) and rebuilt.tile == (8, 8)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tile": (0, 8)}, "tile l1 .*positive int"),
        ({"tile": (4, -8)}, "tile l2 .*positive int"),
        ({"tile": (4.0, 8)}, "tile l1 .*positive int"),
        ({"tile": (True, 8)}, "tile l1 .*positive int"),
        ({"tile": 4}, "tile must be a pair"),
        ({"tile": (4, 8, 2)}, "tile must be a pair"),
        ({"lora_alpha": "1"}, "lora_alpha must be a number"),
        ({"lora_dropout": 1.0}, "lora_dropout must be in"),
        ({"bias": "qab_only"}, "bias must be 'none' or 'all'"),
        ({"use_lora_lr": "yes"}, "use_lora_lr must be True or False"),
    ],
)
def test_invalid_config_values_are_rejected_with_the_field_name(kwargs, message):
    with pytest.raises(ValueError, match="QABLoRAConfig.*" + message):
        QABLoRAConfig(target_modules=["q_proj"], **kwargs)


def test_adapter_is_one_matrix_on_the_tile_grid():
    layer = layer_of(one_layer(tile=(4, 8), d_in=32, d_out=16))
    assert list(layer.qab_H) == ["default"] and layer.qab_H["default"].shape == (16 // 8, 32 // 4)
    assert layer.qab_H["default"].dtype == torch.float32


def test_h_is_zero_and_output_unchanged_at_initialization():
    model = quantize_model(tiny_llama(), tile=(4, 8))
    input_ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(input_ids).logits
        adapted = get_peft_model(model, QABLoRAConfig(target_modules="all-linear"))
        torch.testing.assert_close(adapted(input_ids).logits, reference, rtol=0, atol=0)
    assert all(not h.any() for n, h in adapted.named_parameters() if "qab_H" in n)


def test_forward_equals_base_plus_dense_tile_constant_update():
    adapted = one_layer(tile=(4, 8), d_in=32, d_out=16, bias=True)
    layer = layer_of(adapted)
    h, (l1, l2), s = layer.qab_H["default"].detach(), (4, 8), 2.0
    delta = s * h.repeat_interleave(l2, dim=0).repeat_interleave(l1, dim=1) / l1  # ΔW[j, i] = s·H[j//λ2, i//λ1]/λ1
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        expected = layer.get_base_layer()(x) + x @ delta.T
        torch.testing.assert_close(adapted(x), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(layer.get_delta_weight("default"), delta, rtol=0, atol=0)


def test_scaling_is_lora_alpha():
    one, three = one_layer(lora_alpha=1.0), one_layer(lora_alpha=3.0)
    x = torch.randn(4, 32)
    with torch.no_grad():
        base = layer_of(one).get_base_layer()(x)
        torch.testing.assert_close(three(x) - base, 3 * (one(x) - base), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tile", [(4, 8), (8, 4)])
def test_use_lora_lr_multiplies_the_scaling_by_the_input_pooling_factor(tile):
    plain, scaled = one_layer(tile=tile, lora_alpha=2.0), one_layer(tile=tile, lora_alpha=2.0, use_lora_lr=True)
    assert layer_of(scaled).scaling["default"] == 2.0 * tile[0]
    torch.testing.assert_close(
        layer_of(scaled).get_delta_weight("default"), tile[0] * layer_of(plain).get_delta_weight("default")
    )


def test_under_adamw_a_factor_on_the_scaling_is_the_same_as_that_factor_on_the_lr():
    # s·H is what the model sees, and AdamW's step does not depend on the gradient's scale: with H starting at zero,
    # training at (s, c·lr) and at (c·s, lr) moves s·H identically (up to Adam's eps). So a rule that multiplies s
    # transfers an lr exactly, for QA-BLoRA's one matrix.
    x, target = torch.randn(64, 32, generator=torch.Generator().manual_seed(2)), torch.randn(64, 16)

    def trained_update(alpha: float, lr: float) -> torch.Tensor:
        model = one_layer(lora_alpha=alpha, init_weights=True)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
        for _ in range(5):
            torch.nn.functional.mse_loss(model(x), target).backward()
            optimizer.step()
            optimizer.zero_grad()
        return layer_of(model).get_delta_weight("default")

    torch.testing.assert_close(trained_update(3.0, 1e-2), trained_update(1.0, 3e-2), rtol=1e-4, atol=1e-7)
    assert not torch.allclose(trained_update(3.0, 1e-2), trained_update(1.0, 1e-2))


def test_dropout_acts_only_in_training():
    adapted = one_layer(lora_dropout=0.5)
    x = torch.randn(8, 32)
    reference = one_layer(lora_dropout=0.0)
    with torch.no_grad():
        adapted.eval()
        torch.testing.assert_close(adapted(x), reference(x), rtol=0, atol=0)
        adapted.train()
        assert not torch.allclose(adapted(x), adapted(x))


def test_gradients_reach_only_h():
    model = quantize_model(tiny_llama(), tile=(4, 8))
    adapted = get_peft_model(model, QABLoRAConfig(target_modules="all-linear"))
    input_ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    adapted.train()
    adapted(input_ids, labels=input_ids).loss.backward()
    for name, param in adapted.named_parameters():
        if "qab_H" in name:
            assert param.requires_grad and param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert not param.requires_grad and param.grad is None, name


@pytest.mark.parametrize(("scale_dtype", "zero_dtype"), [("float16", "float16"), ("float16", "float32")])
def test_merge_adds_s_h_over_l1_to_each_tile_zero_point_in_one_rounding(scale_dtype, zero_dtype):
    adapted = one_layer(tile=(4, 8), scale_dtype=scale_dtype, zero_dtype=zero_dtype)
    layer = layer_of(adapted)
    zero, scale = layer.get_base_layer().zero.clone(), layer.get_base_layer().scale.clone()
    adapted.merge_adapter()
    expected = (zero.float() + 2.0 * layer.qab_H["default"].detach() / 4).to(getattr(torch, zero_dtype))
    assert isinstance(layer.get_base_layer(), TileInt4Linear)
    assert torch.equal(layer.get_base_layer().zero, expected)
    assert torch.equal(layer.get_base_layer().scale, scale)  # alpha never changes


@settings(max_examples=60, deadline=None)
@given(
    tile=st.sampled_from([(4, 8), (8, 8), (2, 2), (1, 16), (16, 1), (4, 1)]),
    in_tiles=st.integers(1, 4),
    out_tiles=st.integers(1, 4),
    bias=st.booleans(),
    lead_shape=st.sampled_from([(5,), (2, 3)]),
    seed=st.integers(0, 2**16),
)
def test_merged_forward_equals_unmerged_forward_with_fp32_zero_points(
    tile, in_tiles, out_tiles, bias, lead_shape, seed
):
    l1, l2 = tile
    d_in = l1 * in_tiles * (2 if l1 % 2 else 1)  # codes are packed two per byte along D_in
    adapted = one_layer(tile=tile, d_in=d_in, d_out=l2 * out_tiles, bias=bias, seed=seed)
    x = torch.randn(*lead_shape, d_in)
    with torch.no_grad():
        unmerged = adapted(x)
        adapted.merge_adapter()
        merged = adapted(x)
    assert merged.shape == unmerged.shape
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)


def test_unmerge_restores_zero_points_bit_exactly_although_fp16_rounding_is_not_reversible():
    adapted = one_layer(scale_dtype="float16")
    base = layer_of(adapted).get_base_layer()
    zero = base.zero.clone()
    adapted.merge_adapter()
    assert not torch.equal(base.zero, zero)
    adapted.unmerge_adapter()
    assert torch.equal(base.zero, zero) and base.zero.dtype == torch.float16
