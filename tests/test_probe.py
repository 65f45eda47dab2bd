"""probe_balance: the gradient it measures, the statistics it derives, and the recommendation they give."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_llama
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from peft_balanced import TileInt4Linear, quantize_model
from peft_balanced.probe import BalanceProbe, ProjectionProbe, probe_balance, tile_energy_ratio


def batches(n: int = 2, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {"input_ids": (ids := torch.randint(0, 128, (2, 12), generator=generator)), "labels": ids} for _ in range(n)
    ]


def weight_gradients(model) -> dict[str, torch.Tensor]:
    model.zero_grad()
    for batch in batches():
        model(**batch).loss.backward()
    return {
        n.removesuffix(".weight"): p.grad.clone() for n, p in model.named_parameters() if n.endswith("proj.weight")
    }


def probe_of(rho2: float, shuffled2: float = 1.0) -> BalanceProbe:
    row = ProjectionProbe("q_proj", (64, 64), energy=1.0, rho={1: 1.0, 2: rho2}, rho_shuffled={1: 1.0, 2: shuffled2})
    return BalanceProbe(projections=[row], factors=(1, 2))


def test_tile_energy_ratio_is_lambda_squared_for_a_tile_constant_gradient():
    g = torch.randn(4, 8).repeat_interleave(2, 0).repeat_interleave(2, 1)
    assert tile_energy_ratio(g, 2) == pytest.approx(4.0)


def test_tile_energy_ratio_is_one_for_factor_one():
    assert tile_energy_ratio(torch.randn(6, 10), 1) == pytest.approx(1.0)


def test_the_probe_measures_each_projections_weight_gradient():
    model = tiny_llama()
    expected = weight_gradients(model)
    result = probe_balance(model, batches(), factors=(2, 4))
    for row in result.projections:
        g = expected[row.name]
        assert row.energy == pytest.approx(float(g.double().square().sum()), rel=1e-4)
        assert row.rho[4] == pytest.approx(tile_energy_ratio(g, 4), rel=1e-4)


def test_the_probe_leaves_the_model_as_it_was():
    model = tiny_llama().train()
    probe_balance(model, batches(1), factors=(2,))
    assert model.training
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_the_probe_on_a_tile_int4_base_measures_the_gradient_of_its_dequantized_weights():
    quantized = quantize_model(tiny_llama(), tile=(4, 8))
    reference = tiny_llama()
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, TileInt4Linear):
                reference.get_submodule(name).weight.copy_(module.dequantize(torch.float32))
    expected = weight_gradients(reference)
    rows = probe_balance(quantized, batches(), factors=(2,)).projections
    assert len(rows) == 14
    for row in rows:
        g = expected[row.name]
        assert row.energy == pytest.approx(float(g.double().square().sum()), rel=1e-4)
        assert row.rho[2] == pytest.approx(tile_energy_ratio(g, 2), rel=1e-4)


def test_the_probe_runs_on_a_bitsandbytes_nf4_base(saved_tiny_llama):
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(saved_tiny_llama, quantization_config=nf4, device_map="cpu")
    result = probe_balance(model, batches(1), factors=(2,))
    assert len(result.projections) == 14 and all(row.energy > 0 for row in result.projections)


def test_a_gradient_no_more_local_than_shuffled_recommends_lora():
    recommendation = probe_of(rho2=1.02, shuffled2=1.0).recommendation
    assert recommendation.method == "lora"
    assert "locality 1.02" in recommendation.reason


def test_a_local_gradient_recommends_the_largest_local_factor_with_the_measured_lr_multiplier():
    recommendation = probe_of(rho2=3.0, shuffled2=1.0).recommendation
    assert (recommendation.method, recommendation.balance_factor, recommendation.lr_multiplier) == ("blora", 2, 3.0)
    assert "use_lora_lr=True" in recommendation.reason


def test_a_large_local_factor_is_also_offered_loras_lr_under_use_lora_lr():
    row = ProjectionProbe("q_proj", (64, 64), energy=1.0, rho={1: 1.0, 8: 3.0}, rho_shuffled={1: 1.0, 8: 1.0})
    recommendation = BalanceProbe(projections=[row], factors=(1, 8)).recommendation
    assert recommendation.balance_factor == 8
    assert "use_lora_lr=True" in recommendation.reason


def test_a_projection_that_a_factor_does_not_divide_is_left_out_of_that_factor():
    model = tiny_llama(hidden_size=48, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)
    result = probe_balance(model, batches(1), factors=(2, 32))
    assert all(32 not in row.rho and 2 in row.rho for row in result.projections)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"factors": (0,)}, "factors must be a positive integer"),
        ({"target_modules": ["nope"]}, "no linear layer of the model is named one of \\['nope'\\]"),
        ({"batches": []}, "batches is empty"),
        ({"batches": [{"input_ids": torch.ones(1, 4, dtype=torch.long)}]}, "returned no loss"),
    ],
)
def test_bad_input_is_named(kwargs, message):
    arguments = {"batches": batches(1)} | kwargs
    with pytest.raises(ValueError, match=message):
        probe_balance(tiny_llama(), **arguments)
