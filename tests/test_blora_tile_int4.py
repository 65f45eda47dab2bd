"""BLoRA on a tile-INT4 base (quantize_model): it trains, and merges in place only while the model stays 4-bit."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from tiny import LLAMA_TARGETS, tiny_llama

from peft_balanced import BLoRAConfig, BLoRALinear
from peft_balanced.quant import TileInt4Linear, quantize_model


@pytest.fixture
def input_ids():
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def blora_on_tile_int4(balance_factor: int, tile=(4, 8)):
    config = BLoRAConfig(
        r=4, balance_factor=balance_factor, lora_alpha=8, target_modules=LLAMA_TARGETS, init_weights=False
    )
    return get_peft_model(quantize_model(tiny_llama(), tile=tile), config).eval()


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits


def zeros(model) -> list[torch.Tensor]:
    return [m.zero.clone() for m in model.modules() if isinstance(m, TileInt4Linear)]


def test_blora_wraps_tile_int4_layers_and_trains_only_the_adapter(input_ids):
    model = blora_on_tile_int4(balance_factor=2).train()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, BLoRALinear) and isinstance(layer.get_base_layer(), TileInt4Linear)
    assert layer.quantization_backend.backend_name == "tile int4"
    before = zeros(model)
    model(input_ids, labels=input_ids).loss.backward()
    assert layer.bal_A["default"].weight.grad is not None and layer.bal_B["default"].weight.grad is not None
    assert all(torch.equal(a, b) for a, b in zip(before, zeros(model), strict=True))


def test_update_constant_per_tile_merges_into_the_zero_points_and_stays_4bit(input_ids):
    model = blora_on_tile_int4(balance_factor=8)  # 8x8 blocks contain the 4x8 tiles
    expected = logits(model, input_ids)
    model.merge_adapter()
    torch.testing.assert_close(logits(model, input_ids), expected, rtol=0, atol=1e-5)
    merged = model.merge_and_unload()
    assert len([m for m in merged.modules() if isinstance(m, TileInt4Linear)]) == 2 * len(LLAMA_TARGETS)
    assert not any(isinstance(m, BLoRALinear) for m in merged.modules())
    torch.testing.assert_close(logits(merged, input_ids), expected, rtol=0, atol=1e-5)


def test_unmerge_gives_back_the_zero_points_and_the_outputs(input_ids):
    model = blora_on_tile_int4(balance_factor=8)
    before, expected = zeros(model), logits(model, input_ids)
    model.merge_adapter()
    assert not all(torch.equal(a, b) for a, b in zip(before, zeros(model), strict=True))
    model.unmerge_adapter()
    for a, b in zip(before, zeros(model), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, input_ids), expected, rtol=0, atol=1e-5)


def test_update_not_constant_per_tile_merges_only_through_dequantize(input_ids):
    model = blora_on_tile_int4(balance_factor=2)  # 2x2 blocks cut through the 4x8 tiles
    expected = logits(model, input_ids)
    with pytest.raises(TypeError, match=r"q_proj.*tile int4.*dequantize=True"):
        model.merge_adapter()
    merged = model.merge_and_unload(dequantize=True)
    assert not any(isinstance(m, (TileInt4Linear, BLoRALinear)) for m in merged.modules())
    torch.testing.assert_close(logits(merged, input_ids), expected, rtol=0, atol=1e-4)
