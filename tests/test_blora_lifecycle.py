"""Adapter lifecycle on nn.Linear bases: merge/unmerge, several adapters, unload, dtypes."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from tiny import LLAMA_TARGETS, tiny_llama
from torch import nn

from peft_balanced import BLoRAConfig, BLoRALinear


def random_config(**overrides) -> BLoRAConfig:
    kwargs = dict(r=4, balance_factor=2, lora_alpha=8, target_modules=LLAMA_TARGETS, init_weights=False)
    kwargs.update(overrides)
    return BLoRAConfig(**kwargs)


def logits(model, input_ids, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids, **kwargs).logits


def test_merge_then_unmerge_restores_base_weights(model):
    before = {n: p.clone() for n, p in model.named_parameters()}
    adapted = get_peft_model(model, random_config())
    adapted.merge_adapter()
    adapted.unmerge_adapter()
    for name, param in adapted.base_model.model.named_parameters():
        clean = name.replace(".base_layer", "")
        if clean in before:
            torch.testing.assert_close(param, before[clean], rtol=0, atol=1e-6)


def test_safe_merge_rejects_non_finite_adapter(model):
    adapted = get_peft_model(model, random_config())
    layer = adapted.base_model.model.model.layers[0].self_attn.q_proj
    layer.bal_B["default"].weight.data[0, 0] = float("nan")
    with pytest.raises(ValueError, match="q_proj"):
        adapted.merge_and_unload(safe_merge=True)


def test_merge_and_unload_returns_plain_model_with_same_outputs(model, input_ids):
    adapted = get_peft_model(model, random_config())
    expected = logits(adapted, input_ids)
    merged = adapted.merge_and_unload()
    assert not any(isinstance(m, BLoRALinear) for m in merged.modules())
    torch.testing.assert_close(logits(merged, input_ids), expected, rtol=0, atol=1e-5)


def test_unload_returns_base_model_outputs(model, input_ids):
    reference = logits(model, input_ids)
    unloaded = get_peft_model(model, random_config()).unload()
    assert not any(isinstance(m, BLoRALinear) for m in unloaded.modules())
    torch.testing.assert_close(logits(unloaded, input_ids), reference, rtol=0, atol=0)


def test_disable_adapter_gives_base_outputs(model, input_ids):
    reference = logits(model, input_ids)
    adapted = get_peft_model(model, random_config())
    with adapted.disable_adapter():
        torch.testing.assert_close(logits(adapted, input_ids), reference, rtol=0, atol=0)
    assert not torch.allclose(logits(adapted, input_ids), reference)


def test_second_adapter_is_added_frozen_and_selected_by_set_adapter(model, input_ids):
    adapted = get_peft_model(model, random_config())
    first = logits(adapted, input_ids)
    adapted.add_adapter("other", random_config(r=2, balance_factor=4))
    assert all(not p.requires_grad for n, p in adapted.named_parameters() if ".other." in n)
    torch.testing.assert_close(logits(adapted, input_ids), first)  # "default" is still the active adapter
    adapted.set_adapter("other")
    assert not torch.allclose(logits(adapted, input_ids), first)
    assert all(p.requires_grad for n, p in adapted.named_parameters() if ".other." in n)


def test_two_active_adapters_add_up_and_merge_exactly(model, input_ids):
    adapted = get_peft_model(model, random_config())
    adapted.add_adapter("other", random_config(r=2, balance_factor=4))
    adapted.base_model.set_adapter(["default", "other"])
    both = logits(adapted, input_ids)
    merged = adapted.merge_and_unload(adapter_names=["default", "other"])
    torch.testing.assert_close(logits(merged, input_ids), both, rtol=0, atol=1e-5)


def test_delete_adapter_removes_its_weights(model):
    adapted = get_peft_model(model, random_config())
    adapted.add_adapter("other", random_config())
    adapted.delete_adapter("other")
    assert not any(".other." in n for n, _ in adapted.named_parameters())
    assert list(adapted.peft_config) == ["default"]


def test_mixed_batch_uses_one_adapter_per_sample(model, input_ids):
    adapted = get_peft_model(model, random_config())
    adapted.add_adapter("other", random_config(r=2))
    adapted.eval()
    mixed = logits(adapted, input_ids, adapter_names=["other", "__base__"])
    adapted.set_adapter("other")
    torch.testing.assert_close(mixed[0], logits(adapted, input_ids)[0], rtol=0, atol=1e-5)
    with adapted.disable_adapter():
        torch.testing.assert_close(mixed[1], logits(adapted, input_ids)[1], rtol=0, atol=1e-5)


def test_mixed_batch_rejects_unknown_adapter_name(model, input_ids):
    adapted = get_peft_model(model, random_config()).eval()
    with pytest.raises(ValueError, match="missing"):
        logits(adapted, input_ids, adapter_names=["missing", "default"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_trains_and_merges(dtype, input_ids):
    model = tiny_llama().to(dtype)
    adapted = get_peft_model(model, random_config())
    loss = adapted(input_ids, labels=input_ids).loss
    loss.backward()
    grads = [p.grad for p in adapted.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    adapted.eval()
    expected = logits(adapted, input_ids).float()
    merged = adapted.merge_and_unload()
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == dtype
    torch.testing.assert_close(logits(merged, input_ids).float(), expected, rtol=0.05, atol=0.05)


def test_gradients_reach_only_adapter_weights(model, input_ids):
    adapted = get_peft_model(model, random_config())
    adapted.train()
    adapted(input_ids, labels=input_ids).loss.backward()
    for name, param in adapted.named_parameters():
        if "bal_" in name:
            assert param.requires_grad and param.grad is not None, name
        else:
            assert not param.requires_grad and param.grad is None, name


def test_bias_all_trains_every_bias():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    adapted = get_peft_model(model, BLoRAConfig(r=2, balance_factor=2, target_modules=["0"], bias="all"))
    biases = [p for n, p in adapted.named_parameters() if n.endswith("bias")]
    assert len(biases) == 2 and all(p.requires_grad for p in biases)
