"""QA-BLoRA lifecycle on a tile-INT4 Llama: which bases it accepts, 4-bit merges, several adapters, unload."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import get_peft_model
from tiny import LLAMA_TARGETS, tiny_llama
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from peft_balanced import QABLoRAConfig
from peft_balanced.quant import TileInt4Linear, quantize_model
from peft_balanced.tuners.qablora import QABLoRALinear


def quantized_llama(tile=(4, 8), scale_dtype="float32", zero_dtype="float32", **overrides):
    return quantize_model(tiny_llama(**overrides), tile=tile, scale_dtype=scale_dtype, zero_dtype=zero_dtype)


def random_config(**overrides) -> QABLoRAConfig:
    kwargs = dict(tile=(4, 8), lora_alpha=1.0, target_modules=LLAMA_TARGETS, init_weights=False)
    kwargs.update(overrides)
    return QABLoRAConfig(**kwargs)


def logits(model, input_ids, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids, **kwargs).logits


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


def tile_layers(model) -> list[TileInt4Linear]:
    return [m for m in model.modules() if isinstance(m, TileInt4Linear)]


# ---------------------------------------------------------------- which bases


def test_plain_linear_target_is_rejected_with_its_name_and_how_to_quantize():
    with pytest.raises(
        TypeError, match=r"q_proj.*of type Linear.*quantize_model\(model, tile=\(4, 8\)\).*TileInt4Config"
    ):
        get_peft_model(tiny_llama(), random_config())


def test_nothing_is_changed_when_a_target_is_rejected():
    model = quantized_llama()
    model.model.layers[1].mlp.down_proj = torch.nn.Linear(128, 64, bias=False)  # one target left unquantized
    with pytest.raises(TypeError, match=r"layers\.1\.mlp\.down_proj"):
        get_peft_model(model, random_config())
    assert not any(isinstance(m, QABLoRALinear) for m in model.modules())


def test_tile_int4_base_with_another_tile_is_rejected_with_both_tiles():
    with pytest.raises(ValueError, match=r"q_proj.*tile=\(8, 8\).*QABLoRAConfig.tile=\(4, 8\)"):
        get_peft_model(quantized_llama(tile=(8, 8)), random_config(tile=(4, 8)))


def test_bitsandbytes_nf4_base_is_rejected(saved_tiny_llama):
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(saved_tiny_llama, quantization_config=nf4, device_map="cpu")
    with pytest.raises(TypeError, match=r"q_proj.*Linear4bit.*NF4.*quantize_model"):
        get_peft_model(model, random_config())


def test_all_linear_targets_every_tile_int4_layer_but_not_the_full_precision_head():
    adapted = get_peft_model(quantized_llama(), random_config(target_modules="all-linear"))
    wrapped = [m for m in adapted.modules() if isinstance(m, QABLoRALinear)]
    assert len(wrapped) == 2 * len(LLAMA_TARGETS)
    assert type(adapted.base_model.model.lm_head) is torch.nn.Linear


def test_all_linear_honours_layers_to_transform_and_exclude_modules():
    config = random_config(target_modules="all-linear", layers_to_transform=[1], exclude_modules=["down_proj"])
    adapted = get_peft_model(quantized_llama(), config)
    wrapped = sorted(n for n, m in adapted.named_modules() if isinstance(m, QABLoRALinear))
    assert len(wrapped) == len(LLAMA_TARGETS) - 1
    assert all(".layers.1." in n and not n.endswith("down_proj") for n in wrapped)


def test_layers_with_indivisible_dims_stay_full_precision_and_are_rejected_by_name():
    with pytest.raises(ValueError, match=r"gate_proj.*D_out=132 is not divisible by l2=8"):
        quantized_llama(intermediate_size=132)
    model = quantize_model(tiny_llama(intermediate_size=132), tile=(4, 8), skip_indivisible=True)
    with pytest.raises(TypeError, match=r"layers\.0\.mlp\.gate_proj.*of type Linear.*quantize_model"):
        get_peft_model(model, random_config(target_modules=["gate_proj"]))
    adapted = get_peft_model(model, random_config(target_modules="all-linear"))
    wrapped = {n.rpartition(".")[2] for n, m in adapted.named_modules() if isinstance(m, QABLoRALinear)}
    assert wrapped == set(LLAMA_TARGETS) - {"gate_proj", "up_proj"}


def test_all_linear_on_an_unquantized_model_says_to_quantize_first():
    with pytest.raises(ValueError, match=r"all-linear.*no TileInt4Linear.*quantize_model"):
        get_peft_model(tiny_llama(), random_config(target_modules="all-linear"))


# ---------------------------------------------------------------- merging into the 4-bit base


# The merge itself is exact (ΔW is constant on every tile); what remains is rounding the new zero points into their
# storage dtype: fp32 (the default, also under fp16/bf16 scales) is exact to fp32 rounding, fp16 costs ~1e-3 relative
# (0.6-2.4e-3 measured on tiny Llama logits for random adapters, 1e-3 to 1.3e-2 on SmolLM2 with trained ones:
# benchmarks/studies/qablora_merge_error.py), bf16 ~1e-2. Both are below the 4-bit quantization error itself (~5e-2).
@pytest.mark.parametrize(
    ("scale_dtype", "zero_dtype", "tolerance"),
    [
        ("float32", "float32", 1e-5),
        ("float16", "float32", 1e-5),
        ("bfloat16", "float32", 1e-5),
        ("float16", "float16", 3e-3),
        ("bfloat16", "bfloat16", 3e-2),
    ],
)
def test_merge_and_unload_keeps_4bit_targets_and_the_adapted_outputs(scale_dtype, zero_dtype, tolerance, input_ids):
    adapted = get_peft_model(quantized_llama(scale_dtype=scale_dtype, zero_dtype=zero_dtype), random_config())
    expected = logits(adapted, input_ids)
    merged = adapted.merge_and_unload()
    assert not any(isinstance(m, QABLoRALinear) for m in merged.modules())
    assert len(tile_layers(merged)) == 2 * len(LLAMA_TARGETS)
    assert all(layer.zero.dtype == getattr(torch, zero_dtype) for layer in tile_layers(merged))
    assert all(layer.scale.dtype == getattr(torch, scale_dtype) for layer in tile_layers(merged))
    assert relative_error(logits(merged, input_ids), expected) <= tolerance


def test_merge_then_unmerge_restores_every_quantized_buffer_bit_exactly(input_ids):
    model = quantized_llama(scale_dtype="float16", zero_dtype="float16")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = get_peft_model(model, random_config())
    adapted.merge_adapter()
    adapted.unmerge_adapter()
    after = {
        k.replace(".base_layer", ""): v for k, v in adapted.base_model.model.state_dict().items() if "qab_" not in k
    }
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_merging_two_adapters_one_after_another_equals_both_active(input_ids):
    adapted = get_peft_model(quantized_llama(), random_config())
    adapted.add_adapter("other", random_config(lora_alpha=0.5))
    adapted.base_model.set_adapter(["default", "other"])
    both = logits(adapted, input_ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns that "default" is already merged
        adapted.merge_adapter(["default"])
        adapted.merge_adapter(["other"])
        assert relative_error(logits(adapted, input_ids), both) <= 1e-5
        merged = adapted.merge_and_unload()
    assert relative_error(logits(merged, input_ids), both) <= 1e-5


def test_sequential_merges_round_the_zero_points_once_like_a_joint_merge():
    models = []
    for sequential in (True, False):
        adapted = get_peft_model(quantized_llama(scale_dtype="float16", zero_dtype="float16"), random_config())
        adapted.add_adapter("other", random_config(lora_alpha=0.5))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if sequential:
                adapted.merge_adapter(["default"])
                adapted.merge_adapter(["other"])
            else:
                adapted.merge_adapter(["default", "other"])
        models.append(adapted)
    zeros = [[layer.zero for layer in tile_layers(m)] for m in models]
    assert all(torch.equal(a, b) for a, b in zip(*zeros, strict=True))


def test_safe_merge_rejects_non_finite_adapter_and_leaves_the_base_untouched():
    adapted = get_peft_model(quantized_llama(), random_config())
    layer = adapted.base_model.model.model.layers[0].self_attn.q_proj
    zero = layer.get_base_layer().zero.clone()
    with torch.no_grad():
        layer.qab_H["default"][0, 0] = float("inf")
    with pytest.raises(ValueError, match="q_proj"):
        adapted.merge_and_unload(safe_merge=True)
    assert torch.equal(layer.get_base_layer().zero, zero)


def test_merge_that_overflows_fp16_zero_points_is_rejected():
    model = quantized_llama(scale_dtype="float16", zero_dtype="float16")
    adapted = get_peft_model(model, random_config(lora_alpha=1e8))
    with pytest.raises(ValueError, match=r"q_proj.*NaN or inf.*float16"):
        adapted.merge_adapter()


# ---------------------------------------------------------------- several adapters, disable, unload


def test_unload_returns_base_model_outputs(input_ids):
    model = quantized_llama()
    reference = logits(model, input_ids)
    unloaded = get_peft_model(model, random_config()).unload()
    assert not any(isinstance(m, QABLoRALinear) for m in unloaded.modules())
    assert len(tile_layers(unloaded)) == 2 * len(LLAMA_TARGETS)
    torch.testing.assert_close(logits(unloaded, input_ids), reference, rtol=0, atol=0)


def test_disable_adapter_gives_base_outputs_even_after_a_merge(input_ids):
    model = quantized_llama()
    reference = logits(model, input_ids)
    adapted = get_peft_model(model, random_config())
    adapted.merge_adapter()
    with adapted.disable_adapter():
        torch.testing.assert_close(logits(adapted, input_ids), reference, rtol=0, atol=0)
    assert not torch.allclose(logits(adapted, input_ids), reference)


def test_second_adapter_is_added_frozen_and_selected_by_set_adapter(input_ids):
    adapted = get_peft_model(quantized_llama(), random_config())
    first = logits(adapted, input_ids)
    adapted.add_adapter("other", random_config(lora_alpha=2.0))
    assert all(not p.requires_grad for n, p in adapted.named_parameters() if n.endswith(".other"))
    torch.testing.assert_close(logits(adapted, input_ids), first, rtol=0, atol=0)
    adapted.set_adapter("other")
    assert not torch.allclose(logits(adapted, input_ids), first)
    assert all(p.requires_grad for n, p in adapted.named_parameters() if n.endswith(".other"))


def test_second_adapter_with_another_tile_is_rejected():
    adapted = get_peft_model(quantized_llama(), random_config())
    with pytest.raises(ValueError, match=r"tile=\(4, 8\).*QABLoRAConfig.tile=\(8, 8\)"):
        adapted.add_adapter("other", random_config(tile=(8, 8)))


def test_delete_adapter_removes_its_weights():
    adapted = get_peft_model(quantized_llama(), random_config())
    adapted.add_adapter("other", random_config())
    adapted.delete_adapter("other")
    assert not any(n.endswith(".other") for n, _ in adapted.named_parameters())
    assert list(adapted.peft_config) == ["default"]


def test_mixed_batch_uses_one_adapter_per_sample(input_ids):
    adapted = get_peft_model(quantized_llama(), random_config())
    adapted.add_adapter("other", random_config(lora_alpha=2.0))
    adapted.eval()
    mixed = logits(adapted, input_ids, adapter_names=["other", "__base__"])
    adapted.set_adapter("other")
    torch.testing.assert_close(mixed[0], logits(adapted, input_ids)[0], rtol=0, atol=1e-5)
    with adapted.disable_adapter():
        torch.testing.assert_close(mixed[1], logits(adapted, input_ids)[1], rtol=0, atol=1e-5)


def test_bf16_compute_model_trains_and_merges(input_ids):
    model = quantized_llama().to(torch.bfloat16)
    adapted = get_peft_model(model, random_config())
    adapted.train()
    adapted(input_ids, labels=input_ids).loss.backward()
    grads = [p.grad for p in adapted.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    adapted.eval()
    expected = logits(adapted, input_ids).float()
    merged = adapted.merge_and_unload()
    assert relative_error(logits(merged, input_ids).float(), expected) < 0.02


def test_parameter_count_includes_the_4bit_weights_as_peft_counts_bitsandbytes():
    full_precision = sum(p.numel() for p in tiny_llama().parameters())
    adapted = get_peft_model(quantize_model(tiny_llama()), QABLoRAConfig(target_modules=LLAMA_TARGETS))
    trainable, total = adapted.get_nb_trainable_parameters()
    assert trainable == sum(p.numel() for p in adapted.parameters() if p.requires_grad) > 0
    assert total == full_precision + trainable  # every weight counted once, whether 16-bit or 4-bit
