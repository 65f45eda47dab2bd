"""add_weighted_adapter on BLoRA: exact concatenation of same-λ adapters; other combinations refused clearly."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from tiny import LLAMA_TARGETS, tiny_llama

from peft_balanced import BLoRAConfig, GradApproxConfig, QABLoRAConfig
from peft_balanced.quant import quantize_model


def random_config(**overrides) -> BLoRAConfig:
    kwargs = dict(r=4, balance_factor=2, lora_alpha=8, target_modules=LLAMA_TARGETS, init_weights=False)
    kwargs.update(overrides)
    return BLoRAConfig(**kwargs)


def two_adapters(**second):
    """Adapter "x" (r=4, alpha 8, every projection) and "y" (r=2, alpha 16, q/v only unless overridden)."""
    model = get_peft_model(tiny_llama(), random_config(), adapter_name="x")
    torch.manual_seed(1)
    model.add_adapter(
        "y", random_config(**{"r": 2, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], **second})
    )
    return model


def blora_layers(model):
    return {n: m for n, m in model.named_modules() if hasattr(m, "bal_A")}


def test_cat_combination_equals_the_weighted_sum_of_the_updates_in_every_module():
    model = two_adapters()
    model.add_weighted_adapter(["x", "y"], [0.7, -0.3], "xy", combination_type="cat")
    for name, layer in blora_layers(model).items():
        expected = 0.7 * layer.get_delta_weight("x")
        if "y" in layer.bal_A:
            expected = expected - 0.3 * layer.get_delta_weight("y")
        torch.testing.assert_close(layer.get_delta_weight("xy"), expected, rtol=0, atol=1e-6, msg=name)


def test_combined_adapter_has_the_summed_rank_and_gives_the_combined_output():
    model = two_adapters()
    model.add_weighted_adapter(["x", "y"], [1.0, 1.0], "xy", combination_type="cat")
    assert model.peft_config["xy"].r == 6 and model.peft_config["xy"].balance_factor == 2
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 64)
    base = layer.get_base_layer()(x)
    model.base_model.set_adapter(["x", "y"])
    both = layer(x)
    model.base_model.set_adapter("xy")
    torch.testing.assert_close(layer(x), both, rtol=0, atol=1e-5)
    assert not torch.allclose(both, base)


def test_combined_adapter_is_added_frozen():
    model = two_adapters()
    model.add_weighted_adapter(["x", "y"], [0.5, 0.5], "xy")  # "cat" is the default: the only exact combination
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".xy." in n)
    assert model.active_adapters == ["x"]


@pytest.mark.parametrize("combination_type", ["svd", "linear", "ties"])
def test_other_combination_types_are_refused_naming_blora_and_cat(combination_type):
    model = two_adapters()
    with pytest.raises(NotImplementedError, match=rf"BLoRA.*{combination_type!r}.*combination_type='cat'"):
        model.add_weighted_adapter(["x", "y"], [0.5, 0.5], "xy", combination_type=combination_type)


def test_adapters_with_different_balance_factors_are_refused_with_both_values():
    model = two_adapters(balance_factor=4)
    with pytest.raises(ValueError, match=r"balance_factor.*'x': 2.*'y': 4"):
        model.add_weighted_adapter(["x", "y"], [0.5, 0.5], "xy")


def test_unknown_adapter_and_mismatched_weights_are_refused():
    model = two_adapters()
    with pytest.raises(ValueError, match=r"'z'.*available.*'x'"):
        model.add_weighted_adapter(["x", "z"], [0.5, 0.5], "xz")
    with pytest.raises(ValueError, match="2 adapters but 1 weights"):
        model.add_weighted_adapter(["x", "y"], [0.5], "xy")


def test_qablora_and_gradapprox_refuse_add_weighted_adapter_by_name():
    qab = get_peft_model(quantize_model(tiny_llama()), QABLoRAConfig(target_modules=["q_proj"]))
    with pytest.raises(NotImplementedError, match="not supported for QA-BLoRA"):
        qab.add_weighted_adapter(["default"], [1.0], "combined")
    gax = get_peft_model(tiny_llama(), GradApproxConfig(r=2, target_modules=["q_proj"], init="lora"))
    with pytest.raises(NotImplementedError, match="not supported for GradApprox"):
        gax.add_weighted_adapter(["default"], [1.0], "combined")
