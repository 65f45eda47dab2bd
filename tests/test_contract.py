"""The contract every tuner x base pair keeps (as peft's tests/test_custom_models.py): merge / unmerge, disable,
add / delete adapters, mixed batches, safe merge and save / load, driven by one table.

Tuner-specific behaviour (initialization, tile checks, fp16 zero points, TRL, ...) is tested beside each tuner.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny import LLAMA_TARGETS, tiny_llama

from peft_balanced import BLoRAConfig, GradApproxConfig, QABLoRAConfig
from peft_balanced.demo.models import quantize_linear_nf4
from peft_balanced.quant import quantize_model


def nf4_llama():
    model = tiny_llama()
    quantize_linear_nf4(model)
    return model


def tile_int4_llama():
    return quantize_model(tiny_llama(), tile=(4, 8))


@dataclass(frozen=True)
class Case:
    """One tuner on one base. ``in_place``: ``merge_adapter`` is exact (else it is refused or re-quantizes, and the
    exact merge is ``merge_and_unload(dequantize=True)``); ``atol``: of merged vs attached logits."""

    name: str
    make_base: Callable[[], torch.nn.Module]
    make_config: Callable[[], object]
    in_place: bool
    atol: float
    merge_kwargs: dict = field(default_factory=dict)


def blora(balance_factor=2):
    return lambda: BLoRAConfig(
        r=4, balance_factor=balance_factor, lora_alpha=8, target_modules=LLAMA_TARGETS, init_weights=False
    )


def qablora():
    return QABLoRAConfig(tile=(4, 8), lora_alpha=1.0, target_modules=LLAMA_TARGETS, init_weights=False)


def gradapprox():
    return GradApproxConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, init="lora", init_weights=False)


DEQUANTIZE = {"dequantize": True}
CASES = [
    Case("blora-linear", tiny_llama, blora(), in_place=True, atol=1e-5),
    Case("blora-nf4", nf4_llama, blora(), in_place=False, atol=1e-5, merge_kwargs=DEQUANTIZE),
    Case("blora-tile_int4", tile_int4_llama, blora(balance_factor=8), in_place=True, atol=1e-5),
    Case("qablora-tile_int4", tile_int4_llama, qablora, in_place=True, atol=1e-5),
    Case("gradapprox-linear", tiny_llama, gradapprox, in_place=True, atol=1e-5),
    Case("gradapprox-nf4", nf4_llama, gradapprox, in_place=False, atol=1e-5, merge_kwargs=DEQUANTIZE),
    Case("gradapprox-tile_int4", tile_int4_llama, gradapprox, in_place=False, atol=1e-4, merge_kwargs=DEQUANTIZE),
]
IN_PLACE = [case for case in CASES if case.in_place]


def by_name(cases):
    return pytest.mark.parametrize("case", cases, ids=[case.name for case in cases])


@pytest.fixture
def input_ids():
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model, input_ids, **kwargs):
    with torch.no_grad():
        return model(input_ids, **kwargs).logits


def adapted(case: Case):
    """``(peft_model, base_logits_fn)``: the base model's logits are taken before the adapter is attached."""
    return get_peft_model(case.make_base(), case.make_config()).eval()


@by_name(IN_PLACE)
def test_merge_then_unmerge_keeps_the_adapted_outputs(case, input_ids):
    model = adapted(case)
    expected = logits(model, input_ids)
    model.merge_adapter()
    torch.testing.assert_close(logits(model, input_ids), expected, rtol=0, atol=case.atol)
    model.unmerge_adapter()
    torch.testing.assert_close(logits(model, input_ids), expected, rtol=0, atol=case.atol)


@by_name(CASES)
def test_merge_and_unload_gives_a_plain_model_with_the_adapted_outputs(case, input_ids):
    model = adapted(case)
    expected = logits(model, input_ids)
    merged = model.merge_and_unload(**case.merge_kwargs)
    assert not any(hasattr(module, "base_layer") for module in merged.modules())
    torch.testing.assert_close(logits(merged, input_ids), expected, rtol=0, atol=case.atol)


@by_name(CASES)
def test_disable_adapter_and_unload_give_the_base_outputs(case, input_ids):
    base = case.make_base().eval()
    reference = logits(base, input_ids)
    model = get_peft_model(base, case.make_config()).eval()
    assert not torch.allclose(logits(model, input_ids), reference)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, input_ids), reference, rtol=0, atol=0)
    torch.testing.assert_close(logits(model.unload(), input_ids), reference, rtol=0, atol=0)


@by_name(CASES)
def test_added_adapter_is_frozen_selectable_and_deleted_with_its_weights(case, input_ids):
    model = adapted(case)
    first = logits(model, input_ids)
    model.add_adapter("other", case.make_config())
    other_params = [p for n, p in model.named_parameters() if ".other" in n]
    assert other_params and not any(p.requires_grad for p in other_params)
    torch.testing.assert_close(logits(model, input_ids), first, rtol=0, atol=0)  # "default" is still active
    model.set_adapter("other")
    assert not torch.allclose(logits(model, input_ids), first)
    model.set_adapter("default")
    model.delete_adapter("other")
    assert not any(".other" in key for key in model.state_dict())
    torch.testing.assert_close(logits(model, input_ids), first, rtol=0, atol=0)


@by_name(CASES)
def test_mixed_batch_runs_each_sample_with_its_adapter(case, input_ids):
    model = adapted(case)
    model.add_adapter("other", case.make_config())
    with model.disable_adapter():
        base = logits(model, input_ids)
    default = logits(model, input_ids)
    model.set_adapter("other")
    other = logits(model, input_ids)
    mixed = logits(model, input_ids, adapter_names=["default", "other"])
    torch.testing.assert_close(mixed[0], default[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[1], other[1], rtol=0, atol=1e-5)
    with_base = logits(model, input_ids, adapter_names=["__base__", "other"])
    torch.testing.assert_close(with_base[0], base[0], rtol=0, atol=1e-5)


@by_name(CASES)
def test_safe_merge_rejects_a_non_finite_adapter(case):
    model = adapted(case)
    name, param = next((n, p) for n, p in model.named_parameters() if p.requires_grad and "q_proj" in n)
    param.data.view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match=r"(?i)nan.*q_proj|q_proj.*nan"):
        model.merge_and_unload(safe_merge=True, **case.merge_kwargs)


@by_name(CASES)
def test_save_then_load_gives_the_same_outputs(case, input_ids, tmp_path):
    model = adapted(case)
    expected = logits(model, input_ids)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(case.make_base(), tmp_path).eval()
    assert type(loaded.peft_config["default"]) is type(model.peft_config["default"])
    torch.testing.assert_close(logits(loaded, input_ids), expected, rtol=0, atol=0)
