"""QA-BLoRA checkpoints: the adapter (PeftModel / AutoPeftModel, fresh process) and the merged 4-bit model."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny import LLAMA_TARGETS, tiny_llama
from transformers import AutoModelForCausalLM

from peft_balanced import QABLoRAConfig
from peft_balanced.quant import TileInt4Linear, quantize_model

TESTS_DIR = Path(__file__).parent


def run_fresh_python(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a new interpreter with the tests folder importable (for ``tiny``)."""
    prelude = f"import sys; sys.path.insert(0, {str(TESTS_DIR)!r})\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )


def quantized_llama(tile=(4, 8)):
    return quantize_model(tiny_llama(), tile=tile, scale_dtype="float16")  # fp32 zero points (the default)


@pytest.fixture
def saved_adapter(tmp_path, input_ids) -> Path:
    """A random-H QA-BLoRA adapter on the 4-bit tiny_llama(seed=0), plus its logits on ``input_ids``."""
    adapted = get_peft_model(
        quantized_llama(), QABLoRAConfig(tile=(4, 8), lora_alpha=2.0, target_modules=LLAMA_TARGETS, init_weights=False)
    )
    adapted.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        torch.save({"input_ids": input_ids, "logits": adapted(input_ids).logits}, tmp_path / "expected.pt")
    return tmp_path / "adapter"


def test_adapter_config_declares_peft_type_qablora_and_its_tile(saved_adapter):
    config = json.loads((saved_adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "QABLORA"
    assert config["tile"] == [4, 8] and config["lora_alpha"] == 2.0


def test_checkpoint_holds_only_the_h_matrices(saved_adapter):
    state = load_file(saved_adapter / "adapter_model.safetensors")
    assert len(state) == 2 * len(LLAMA_TARGETS)
    assert all(k.endswith(".qab_H") for k in state)
    assert state["base_model.model.model.layers.0.self_attn.q_proj.qab_H"].shape == (64 // 8, 64 // 4)


def test_save_then_load_in_new_process_is_bit_exact(saved_adapter):
    result = run_fresh_python(
        f"""
        import torch, peft_balanced
        from peft import PeftModel
        from peft_balanced.quant import quantize_model
        from tiny import tiny_llama
        expected = torch.load({str(saved_adapter.parent / "expected.pt")!r})
        base = quantize_model(tiny_llama(), tile=(4, 8), scale_dtype="float16")
        model = PeftModel.from_pretrained(base, {str(saved_adapter)!r})
        with torch.no_grad():
            logits = model(expected["input_ids"]).logits
        assert torch.equal(logits, expected["logits"]), (logits - expected["logits"]).abs().max()
        print("BIT-EXACT")
        """
    )
    assert "BIT-EXACT" in result.stdout, result.stderr[-2000:]


def test_auto_peft_model_reloads_the_saved_4bit_base_and_the_adapter(tmp_path, saved_adapter, input_ids):
    base_dir = tmp_path / "base"
    quantized_llama().save_pretrained(base_dir)
    config_path = saved_adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = str(base_dir)
    config_path.write_text(json.dumps(config))
    model = AutoPeftModelForCausalLM.from_pretrained(saved_adapter)
    assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj.get_base_layer(), TileInt4Linear)
    expected = torch.load(saved_adapter.parent / "expected.pt")
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, expected["logits"])


def test_transformers_load_adapter_attaches_qablora(saved_adapter, input_ids):
    model = quantized_llama()
    model.load_adapter(str(saved_adapter))
    expected = torch.load(saved_adapter.parent / "expected.pt")
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, expected["logits"])


def test_low_cpu_mem_usage_load_is_bit_exact(saved_adapter, input_ids):
    model = PeftModel.from_pretrained(quantized_llama(), saved_adapter, low_cpu_mem_usage=True)
    expected = torch.load(saved_adapter.parent / "expected.pt")
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, expected["logits"])


def test_modules_to_save_and_trainable_tokens_are_trained_saved_and_restored(tmp_path, input_ids):
    config = QABLoRAConfig(
        target_modules=LLAMA_TARGETS, init_weights=False, modules_to_save=["lm_head"], trainable_token_indices=[5, 6]
    )
    adapted = get_peft_model(quantized_llama(), config)
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert any("lm_head" in n for n in trainable) and any("trainable_tokens" in n for n in trainable)
    with torch.no_grad():
        adapted.base_model.model.lm_head.modules_to_save["default"].weight.mul_(2)
        expected = adapted(input_ids).logits
    adapted.save_pretrained(tmp_path / "adapter")
    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert any("lm_head" in k for k in keys) and any("token_adapter" in k for k in keys)
    reloaded = PeftModel.from_pretrained(quantized_llama(), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids).logits, expected)


def test_is_trainable_resumes_training(saved_adapter, input_ids):
    frozen = PeftModel.from_pretrained(quantized_llama(), saved_adapter)
    assert not any(p.requires_grad for p in frozen.parameters())
    model = PeftModel.from_pretrained(quantized_llama(), saved_adapter, is_trainable=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 2 * len(LLAMA_TARGETS)
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    before = [p.clone() for p in trainable]
    model(input_ids, labels=input_ids).loss.backward()
    optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, trainable, strict=True))


def test_loading_onto_a_base_with_another_tile_names_the_module(saved_adapter):
    with pytest.raises(ValueError, match=r"q_proj.*tile=\(8, 8\).*QABLoRAConfig.tile=\(4, 8\)"):
        PeftModel.from_pretrained(quantized_llama(tile=(8, 8)), saved_adapter)


def test_loading_onto_an_unquantized_base_says_to_quantize_first(saved_adapter):
    with pytest.raises(TypeError, match=r"q_proj.*quantize_model"):
        PeftModel.from_pretrained(tiny_llama(), saved_adapter)


def test_merged_4bit_model_saves_and_reloads_in_a_new_process_with_the_same_outputs(tmp_path, saved_adapter):
    merged = PeftModel.from_pretrained(quantized_llama(), saved_adapter).merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    saved = load_file(tmp_path / "merged" / "model.safetensors")
    assert not any("qab_" in k for k in saved)
    assert saved["model.layers.0.self_attn.q_proj.qweight"].dtype == torch.uint8
    expected_path = str(saved_adapter.parent / "expected.pt")
    result = run_fresh_python(
        f"""
        import torch, peft_balanced
        from transformers import AutoModelForCausalLM
        from peft_balanced.quant import TileInt4Linear
        expected = torch.load({expected_path!r})
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "merged")!r})
        assert isinstance(model.model.layers[0].self_attn.q_proj, TileInt4Linear)
        with torch.no_grad():
            logits = model(expected["input_ids"]).logits
        error = float((logits - expected["logits"]).norm() / expected["logits"].norm())
        assert error < 1e-5, error  # fp32 zero points (the default): the merged β is not rounded to 16 bits
        torch.save(logits, {str(tmp_path / "reloaded.pt")!r})
        print("SAME")
        """
    )
    assert "SAME" in result.stdout, result.stderr[-2000:]
    with torch.no_grad():
        in_memory = merged(torch.load(expected_path)["input_ids"]).logits
    assert torch.equal(torch.load(tmp_path / "reloaded.pt"), in_memory)  # the reload itself is bit-exact


def test_reloaded_merged_model_is_still_4bit(tmp_path, saved_adapter):
    PeftModel.from_pretrained(quantized_llama(), saved_adapter).merge_and_unload().save_pretrained(tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert reloaded.config.quantization_config.tile == (4, 8)
    layers = [m for m in reloaded.modules() if isinstance(m, TileInt4Linear)]
    assert len(layers) == 2 * len(LLAMA_TARGETS) and all(m.bits_per_weight() == 5.5 for m in layers)
    assert all(m.scale.dtype == torch.float16 and m.zero.dtype == torch.float32 for m in layers)


def test_lora_like_alpha_warns_that_it_is_the_scale_itself():
    with pytest.warns(UserWarning, match=r"lora_alpha=32 is the scale s.*not LoRA's alpha divided by r.*32x"):
        QABLoRAConfig(target_modules=["q_proj"], lora_alpha=32)


def test_default_and_small_alphas_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        QABLoRAConfig(target_modules=["q_proj"])
        QABLoRAConfig(target_modules=["q_proj"], lora_alpha=2.0)


def test_saved_config_with_a_lora_like_alpha_still_loads_with_its_value(tmp_path):
    with pytest.warns(UserWarning):
        QABLoRAConfig(target_modules=["q_proj"], lora_alpha=16).save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="lora_alpha=16"):
        loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, QABLoRAConfig) and loaded.lora_alpha == 16
