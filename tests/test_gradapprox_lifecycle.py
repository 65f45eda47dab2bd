"""GradApprox adapters through their life: merge, adapters, checkpoints, and 4-bit / 16-bit bases."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny import LLAMA_TARGETS, tiny_llama
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from peft_balanced import GradApproxConfig, init_gradapprox
from peft_balanced.quant import TileInt4Linear, quantize_model
from peft_balanced.tuners.gradapprox import GradApproxLinear

TESTS_DIR = Path(__file__).parent


def token_batches(n: int = 1, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {"input_ids": (ids := torch.randint(0, 128, (2, 12), generator=generator)), "labels": ids} for _ in range(n)
    ]


def config(**overrides) -> GradApproxConfig:
    kwargs = dict(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, estimation_batches=1)
    kwargs.update(overrides)
    return GradApproxConfig(**kwargs)


def trained(model, adapter_name: str = "default", seed: int = 0):
    """Gradient-initialise ``adapter_name``, then move A and B as training would (so B A − B0 A0 ≠ 0)."""
    init_gradapprox(model, token_batches(), progress=False, adapter_name=adapter_name)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if f".{adapter_name}." in name and "gax_" in name:
                param.add_(0.05 * torch.randn(param.shape, generator=generator).to(param.dtype))
    return model


def logits(model, input_ids, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids, **kwargs).logits


def q_proj(model) -> GradApproxLinear:
    return model.base_model.model.model.layers[0].self_attn.q_proj


def test_forward_equals_base_plus_delta_weight():
    layer = q_proj(trained(get_peft_model(tiny_llama(), config())))
    x = torch.randn(3, 5, 64)
    base = layer.get_base_layer()
    expected = base(x) + x @ layer.get_delta_weight("default").T
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)


def test_merged_forward_equals_unmerged_forward(input_ids):
    model = trained(get_peft_model(tiny_llama(), config())).eval()
    expected = logits(model, input_ids)
    model.merge_adapter()
    torch.testing.assert_close(logits(model, input_ids), expected, rtol=0, atol=1e-5)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, GradApproxLinear) for m in merged.modules())
    torch.testing.assert_close(logits(merged, input_ids), expected, rtol=0, atol=1e-5)


def test_merge_then_unmerge_restores_base_weights():
    model = trained(get_peft_model(tiny_llama(), config()))
    before = q_proj(model).get_base_layer().weight.clone()
    model.merge_adapter()
    assert not torch.allclose(q_proj(model).get_base_layer().weight, before)
    model.unmerge_adapter()
    torch.testing.assert_close(q_proj(model).get_base_layer().weight, before, rtol=0, atol=1e-6)


def test_disable_adapter_and_unload_give_base_outputs(input_ids):
    reference = logits(tiny_llama(), input_ids)
    model = trained(get_peft_model(tiny_llama(), config())).eval()
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, input_ids), reference, rtol=0, atol=0)
    assert not torch.allclose(logits(model, input_ids), reference)
    torch.testing.assert_close(logits(model.unload(), input_ids), reference, rtol=0, atol=0)


def test_second_adapter_is_initialised_separately_and_deleted_with_its_buffers(input_ids):
    model = trained(get_peft_model(tiny_llama(), config()))
    model.add_adapter("other", config(r=2))
    model.set_adapter("other")
    before = logits(model.eval(), input_ids)
    report = init_gradapprox(model, token_batches(), progress=False)  # the active adapter: "other"
    assert all(s.shape == (4,) for s in report.singular_values.values())
    torch.testing.assert_close(logits(model.eval(), input_ids), before, rtol=0, atol=0)
    model.delete_adapter("other")
    assert not any(".other" in key for key in model.state_dict())


def test_mixed_batch_uses_one_adapter_per_sample(input_ids):
    model = trained(get_peft_model(tiny_llama(), config())).eval()
    mixed = logits(model, input_ids, adapter_names=["default", "__base__"])
    torch.testing.assert_close(mixed[0], logits(model, input_ids)[0], rtol=0, atol=1e-5)
    with model.disable_adapter():
        torch.testing.assert_close(mixed[1], logits(model, input_ids)[1], rtol=0, atol=1e-5)


def test_safe_merge_rejects_non_finite_adapter():
    model = trained(get_peft_model(tiny_llama(), config()))
    q_proj(model).gax_B["default"].weight.data[0, 0] = float("nan")
    with pytest.raises(ValueError, match="q_proj"):
        model.merge_and_unload(safe_merge=True)


@pytest.fixture
def saved_adapter(tmp_path, input_ids) -> Path:
    model = trained(get_peft_model(tiny_llama(), config())).eval()
    model.save_pretrained(tmp_path / "adapter")
    torch.save({"input_ids": input_ids, "logits": logits(model, input_ids)}, tmp_path / "expected.pt")
    return tmp_path / "adapter"


def test_checkpoint_holds_the_adapter_and_its_initial_weights(saved_adapter):
    assert json.loads((saved_adapter / "adapter_config.json").read_text())["peft_type"] == "GRADAPPROX"
    state = load_file(saved_adapter / "adapter_model.safetensors")
    kinds = {part for key in state for part in key.split(".") if part.startswith("gax_")}
    assert kinds == {"gax_A", "gax_B", "gax_A0", "gax_B0"}, sorted(state)[:8]
    assert len(state) == 4 * 2 * len(LLAMA_TARGETS)


def test_save_then_load_in_new_process_is_bit_exact(saved_adapter):
    code = f"""
        import sys; sys.path.insert(0, {str(TESTS_DIR)!r})
        import torch, peft_balanced
        from peft import PeftModel
        from tiny import tiny_llama
        expected = torch.load({str(saved_adapter.parent / "expected.pt")!r})
        model = PeftModel.from_pretrained(tiny_llama(), {str(saved_adapter)!r})
        with torch.no_grad():
            out = model(expected["input_ids"]).logits
        assert torch.equal(out, expected["logits"]), (out - expected["logits"]).abs().max()
        print("BIT-EXACT")
        """
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert "BIT-EXACT" in result.stdout, result.stderr[-2000:]


def test_loading_trainable_keeps_initial_weights_frozen(saved_adapter):
    model = PeftModel.from_pretrained(tiny_llama(), saved_adapter, is_trainable=True)
    trainable = {n.split(".")[-3] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"gax_A", "gax_B"}
    assert {"gax_A0.default", "gax_B0.default"} <= {n for n, _ in q_proj(model).named_buffers()}


def test_loading_onto_model_with_other_shapes_names_the_module(saved_adapter):
    with pytest.raises(ValueError, match=r"q_proj.*in_features=128"):
        PeftModel.from_pretrained(tiny_llama(hidden_size=128), saved_adapter)


def load_4bit(path: str):
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization, device_map="cpu")


def test_4bit_base_initialises_without_changing_outputs_and_merges_losslessly(saved_tiny_llama, input_ids):
    model = get_peft_model(load_4bit(saved_tiny_llama), config()).eval()
    assert isinstance(q_proj(model).get_base_layer(), bnb.nn.Linear4bit)
    before = logits(model, input_ids)
    init_gradapprox(model, token_batches(), progress=False)
    assert q_proj(model).gax_B["default"].weight.abs().sum() > 0
    torch.testing.assert_close(logits(model, input_ids), before, rtol=0, atol=0)
    trained(model)  # re-initialising is allowed while A = A0 and B = B0; then A, B move
    expected = logits(model.eval(), input_ids)
    merged = model.merge_and_unload(dequantize=True)
    assert not any(isinstance(m, (bnb.nn.Linear4bit, GradApproxLinear)) for m in merged.modules())
    torch.testing.assert_close(logits(merged, input_ids), expected, rtol=0, atol=1e-5)


def test_tile_int4_base_trains_and_merges_only_through_dequantize(input_ids):
    model = get_peft_model(quantize_model(tiny_llama(), tile=(4, 8)), config()).eval()
    assert isinstance(q_proj(model).get_base_layer(), TileInt4Linear)
    before = logits(model, input_ids)
    trained(model)
    model.train()
    model(input_ids, labels=input_ids).loss.backward()
    assert q_proj(model).gax_A["default"].weight.grad is not None
    expected = logits(model.eval(), input_ids)
    assert not torch.allclose(expected, before)
    with pytest.raises(TypeError, match=r"q_proj.*tile int4.*dequantize=True"):
        model.merge_adapter()
    merged = model.merge_and_unload(dequantize=True)
    assert not any(isinstance(m, (TileInt4Linear, GradApproxLinear)) for m in merged.modules())
    torch.testing.assert_close(logits(merged, input_ids), expected, rtol=0, atol=1e-4)


def test_bf16_base_keeps_outputs_exact_at_init_and_trains(input_ids):
    model = get_peft_model(tiny_llama().to(torch.bfloat16), config()).eval()
    before = logits(model, input_ids)
    init_gradapprox(model, token_batches(), progress=False)
    layer = q_proj(model)
    assert layer.gax_A0["default"].dtype == layer.gax_A["default"].weight.dtype  # peft keeps adapters in float32
    torch.testing.assert_close(logits(model, input_ids), before, rtol=0, atol=0)
    model.train()
    model(input_ids, labels=input_ids).loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_transformers_load_adapter_attaches_gradapprox(saved_adapter):
    model = tiny_llama()
    model.load_adapter(str(saved_adapter))
    expected = torch.load(saved_adapter.parent / "expected.pt")
    torch.testing.assert_close(logits(model, expected["input_ids"]), expected["logits"], rtol=0, atol=1e-6)


def test_init_weights_false_gives_a_random_non_zero_update(input_ids):
    model = get_peft_model(tiny_llama(), config(init_weights=False)).eval()
    assert q_proj(model).gax_A0["default"].abs().sum() == 0
    assert not torch.allclose(logits(model, input_ids), logits(tiny_llama(), input_ids))


def test_8bit_base_forward_and_merge():
    torch.manual_seed(0)
    dense = torch.nn.Linear(64, 128)
    layer8 = bnb.nn.Linear8bitLt(64, 128, has_fp16_weights=False)
    layer8.weight = bnb.nn.Int8Params(dense.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    layer8.bias = torch.nn.Parameter(dense.bias.data.clone(), requires_grad=False)
    model = get_peft_model(torch.nn.Sequential(layer8.to("cpu")), config(target_modules=["0"], init_weights=False))
    assert isinstance(model.base_model.model[0].get_base_layer(), bnb.nn.Linear8bitLt)
    x = torch.randn(3, 64)
    with torch.no_grad():
        unmerged = model(x)
        model.merge_adapter()
        torch.testing.assert_close(model(x), unmerged, rtol=0.05, atol=0.05)  # 8-bit re-quantization


def train_forward(model) -> torch.Tensor:
    """One training-mode forward + backward (what a Trainer's first step does); returns the loss."""
    model.train()
    loss = model(**token_batches()[0]).loss
    loss.backward()
    return loss


def test_training_a_gradient_init_adapter_before_its_initialization_is_refused():
    model = get_peft_model(tiny_llama(), config())
    with pytest.raises(RuntimeError, match=r"'default' has init='gradient'.*GradApproxInitCallback.*init_gradapprox"):
        train_forward(model)


def test_eval_and_no_grad_forwards_before_the_initialization_are_allowed(input_ids):
    model = get_peft_model(tiny_llama(), config())
    logits(model.eval(), input_ids)
    model.train()
    with torch.no_grad():
        model(input_ids)


def test_training_after_init_gradapprox_is_allowed():
    model = get_peft_model(tiny_llama(), config())
    init_gradapprox(model, token_batches(), progress=False)
    assert torch.isfinite(train_forward(model))
    assert q_proj(model).gax_B["default"].weight.grad is not None


def test_lora_init_adapter_trains_without_initialization():
    model = get_peft_model(tiny_llama(), config(init="lora"))
    assert torch.isfinite(train_forward(model))


def test_reloaded_gradient_initialised_adapter_trains_without_initialization(saved_adapter):
    model = PeftModel.from_pretrained(tiny_llama(), saved_adapter, is_trainable=True)
    assert torch.isfinite(train_forward(model))


def test_reloaded_adapter_saved_before_its_initialization_is_refused_training(tmp_path):
    get_peft_model(tiny_llama(), config()).save_pretrained(tmp_path / "never-initialised")
    model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "never-initialised", is_trainable=True)
    with pytest.raises(RuntimeError, match="gradient initialization has not run"):
        train_forward(model)
