"""Q-BLoRA: BLoRA on real bitsandbytes 4-bit and 8-bit bases (they run on CPU)."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.functional import dequantize_4bit, has_avx512bf16
from peft import get_peft_model
from tiny import LLAMA_TARGETS
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from peft_balanced import BLoRAConfig, BLoRALinear


def load_4bit(path: str, quant_type: str = "nf4", double_quant: bool = True):
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.float32,
    )
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu")


def random_config(**overrides) -> BLoRAConfig:
    kwargs = dict(r=4, balance_factor=2, lora_alpha=8, target_modules=LLAMA_TARGETS, init_weights=False)
    kwargs.update(overrides)
    return BLoRAConfig(**kwargs)


def logits(model, input_ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids).logits


def q_proj(peft_model) -> BLoRALinear:
    return peft_model.base_model.model.model.layers[0].self_attn.q_proj


@pytest.mark.parametrize(("quant_type", "double_quant"), [("nf4", True), ("nf4", False), ("fp4", True)])
def test_4bit_base_is_wrapped_and_trains(saved_tiny_llama, input_ids, quant_type, double_quant):
    adapted = get_peft_model(load_4bit(saved_tiny_llama, quant_type, double_quant), random_config())
    assert isinstance(q_proj(adapted).get_base_layer(), bnb.nn.Linear4bit)
    adapted.train()
    adapted(input_ids, labels=input_ids).loss.backward()
    grads = [p.grad for n, p in adapted.named_parameters() if "bal_" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_4bit_output_unchanged_at_initialization(saved_tiny_llama, input_ids):
    model = load_4bit(saved_tiny_llama)
    for module in model.modules():  # compare like with like: no bf16 CPU kernel on either side
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    reference = logits(model, input_ids)
    adapted = get_peft_model(model, random_config(init_weights=True))
    torch.testing.assert_close(logits(adapted, input_ids), reference, rtol=0, atol=0)


def test_merge_and_unload_dequantize_is_lossless(saved_tiny_llama, input_ids):
    adapted = get_peft_model(load_4bit(saved_tiny_llama), random_config()).eval()
    expected = logits(adapted, input_ids)
    merged = adapted.merge_and_unload(dequantize=True)
    assert not any(isinstance(m, (bnb.nn.Linear4bit, BLoRALinear)) for m in merged.modules())
    assert getattr(merged.config, "quantization_config", None) is None
    torch.testing.assert_close(logits(merged, input_ids), expected, rtol=0, atol=1e-5)


def test_merge_and_unload_requantizes_a_4bit_base(saved_tiny_llama, input_ids):
    adapted = get_peft_model(load_4bit(saved_tiny_llama), random_config()).eval()
    expected = logits(adapted, input_ids)
    merged = adapted.merge_and_unload()
    assert isinstance(merged.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    error = (logits(merged, input_ids) - expected).abs().max()
    assert 0 < error < 0.5 * expected.abs().max()  # re-quantization error: present but bounded


def test_merge_after_cpu_repacking_eval_forward_is_correct(saved_tiny_llama, input_ids):
    """bitsandbytes repacks 4-bit weights during an eval forward on AVX512-BF16 CPUs; merging must undo it.

    The repack itself rounds the block scales to bf16 (bitsandbytes' doing), so the merged weight may differ from
    the pre-forward weight by that rounding (well under 1% of max |W|), whereas a merge that dequantizes the
    repacked layout as if it were the standard one is off by the size of the weights themselves.
    """
    model = load_4bit(saved_tiny_llama)
    linear = model.model.layers[0].self_attn.q_proj
    original = dequantize_4bit(linear.weight.data.clone(), linear.weight.quant_state).clone()
    logits(model, input_ids)  # eval forward before wrapping: repacks every 4-bit weight in place on such CPUs
    if has_avx512bf16():
        assert linear.weight.quant_state.packing_format_for_cpu
        naive = dequantize_4bit(linear.weight.data, linear.weight.quant_state)
        assert (naive - original).abs().max() > 0.5 * original.abs().max()  # the trap is real here
    adapted = get_peft_model(model, random_config())
    expected = original + q_proj(adapted).get_delta_weight("default")
    merged = adapted.merge_and_unload(dequantize=True)
    merged_weight = merged.model.layers[0].self_attn.q_proj.weight
    torch.testing.assert_close(merged_weight, expected, rtol=0, atol=0.01 * original.abs().max().item())


def test_wrapped_4bit_layer_is_not_repacked_by_eval_forward(saved_tiny_llama, input_ids):
    adapted = get_peft_model(load_4bit(saved_tiny_llama), random_config()).eval()
    logits(adapted, input_ids)
    quant_state = q_proj(adapted).get_base_layer().weight.quant_state
    assert not getattr(quant_state, "packing_format_for_cpu", False)


def test_8bit_base_forward_and_merge(input_ids):
    torch.manual_seed(0)
    dense = nn.Linear(64, 128)
    layer8 = bnb.nn.Linear8bitLt(64, 128, has_fp16_weights=False)
    layer8.weight = bnb.nn.Int8Params(dense.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    layer8.bias = nn.Parameter(dense.bias.data.clone(), requires_grad=False)
    layer8 = layer8.to("cpu")
    model = nn.Sequential(layer8)
    adapted = get_peft_model(model, BLoRAConfig(r=4, balance_factor=2, target_modules=["0"], init_weights=False))
    x = torch.randn(3, 64)
    with torch.no_grad():
        unmerged = adapted(x)
        adapted.merge_adapter()
        merged = adapted(x)
    assert isinstance(adapted.base_model.model[0].get_base_layer(), bnb.nn.Linear8bitLt)
    torch.testing.assert_close(merged, unmerged, rtol=0.05, atol=0.05)  # 8-bit re-quantization


def test_dequantize_merge_after_a_merge_and_unload_is_refused(saved_tiny_llama):
    adapted = get_peft_model(load_4bit(saved_tiny_llama), random_config())
    adapted.merge_and_unload()  # re-quantized: running the dequantize merge now would be lossy
    with pytest.raises(ValueError, match="already merged and unloaded"):
        adapted.merge_and_unload(dequantize=True)


def test_dequantize_merge_after_merge_adapter_is_refused(saved_tiny_llama):
    adapted = get_peft_model(load_4bit(saved_tiny_llama), random_config())
    adapted.merge_adapter()
    with pytest.raises(ValueError, match=r"already merged into the quantized weights.*q_proj"):
        adapted.merge_and_unload(dequantize=True)


def test_merge_and_unload_twice_on_a_16bit_base_is_refused(model):
    adapted = get_peft_model(model, random_config())
    adapted.merge_and_unload()
    with pytest.raises(ValueError, match="already merged and unloaded"):
        adapted.merge_and_unload()


def test_merge_and_unload_of_merged_adapters_on_a_16bit_base_stays_exact(model, input_ids):
    adapted = get_peft_model(model, random_config())
    expected = logits(adapted, input_ids)
    adapted.merge_adapter()
    merged = adapted.merge_and_unload(dequantize=True)  # nothing is quantized: merging first loses nothing
    torch.testing.assert_close(logits(merged, input_ids), expected, rtol=0, atol=1e-5)
