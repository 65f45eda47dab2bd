"""Checkpoints: save_pretrained / from_pretrained in a fresh process, the ecosystem's loaders, broken inputs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny import LLAMA_TARGETS, tiny_llama

from peft_balanced import BLoRAConfig

TESTS_DIR = Path(__file__).parent


def run_fresh_python(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a new interpreter with the tests folder importable (for ``conftest.tiny_llama``)."""
    prelude = f"import sys; sys.path.insert(0, {str(TESTS_DIR)!r})\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )


@pytest.fixture
def saved_adapter(tmp_path, input_ids) -> Path:
    """A trained-looking (random B) BLoRA adapter on tiny_llama(seed=0), plus its logits on ``input_ids``."""
    adapted = get_peft_model(
        tiny_llama(), BLoRAConfig(r=4, balance_factor=2, target_modules=LLAMA_TARGETS, init_weights=False)
    )
    adapted.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        torch.save({"input_ids": input_ids, "logits": adapted(input_ids).logits}, tmp_path / "expected.pt")
    return tmp_path / "adapter"


def test_adapter_config_declares_peft_type_blora(saved_adapter):
    config = json.loads((saved_adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "BLORA"
    assert config["balance_factor"] == 2


def test_checkpoint_holds_only_adapter_weights(saved_adapter):
    state = load_file(saved_adapter / "adapter_model.safetensors")
    assert state and all(".bal_A." in k or ".bal_B." in k for k in state)


def test_save_then_load_in_new_process_is_bit_exact(saved_adapter):
    result = run_fresh_python(
        f"""
        import torch, peft_balanced
        from peft import PeftModel
        from tiny import tiny_llama
        expected = torch.load({str(saved_adapter.parent / "expected.pt")!r})
        model = PeftModel.from_pretrained(tiny_llama(), {str(saved_adapter)!r})
        with torch.no_grad():
            logits = model(expected["input_ids"]).logits
        assert torch.equal(logits, expected["logits"]), (logits - expected["logits"]).abs().max()
        print("BIT-EXACT")
        """
    )
    assert "BIT-EXACT" in result.stdout, result.stderr[-2000:]


def test_load_without_import_tells_the_user_to_import_peft_balanced(saved_adapter):
    result = run_fresh_python(
        f"""
        from peft import PeftModel
        from tiny import tiny_llama
        PeftModel.from_pretrained(tiny_llama(), {str(saved_adapter)!r})
        """
    )
    assert result.returncode != 0
    assert "KeyError" in result.stderr and "import peft_balanced" in result.stderr, result.stderr[-2000:]


def test_startup_hook_imports_neither_torch_nor_the_plugin():
    result = run_fresh_python(
        """
        import sys
        assert "torch" not in sys.modules and "peft_balanced" not in sys.modules, sorted(sys.modules)
        print("LIGHT")
        """
    )
    assert "LIGHT" in result.stdout, result.stderr[-2000:]


def test_auto_peft_model_loads_with_base_saved_alongside(tmp_path, saved_adapter, input_ids):
    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    config_path = saved_adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = str(base_dir)
    config_path.write_text(json.dumps(config))
    model = AutoPeftModelForCausalLM.from_pretrained(saved_adapter)
    expected = torch.load(saved_adapter.parent / "expected.pt")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, expected["logits"], rtol=0, atol=1e-6)


def test_transformers_load_adapter_attaches_blora(saved_adapter, input_ids):
    model = tiny_llama()
    model.load_adapter(str(saved_adapter))
    expected = torch.load(saved_adapter.parent / "expected.pt")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, expected["logits"], rtol=0, atol=1e-6)


def test_is_trainable_resumes_training(saved_adapter, input_ids):
    frozen = PeftModel.from_pretrained(tiny_llama(), saved_adapter)
    assert not any(p.requires_grad for p in frozen.parameters())
    model = PeftModel.from_pretrained(tiny_llama(), saved_adapter, is_trainable=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    before = [p.clone() for p in trainable]
    model(input_ids, labels=input_ids).loss.backward()
    optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, trainable, strict=True))


def test_loading_onto_model_with_other_shapes_names_the_module(saved_adapter):
    with pytest.raises(ValueError, match=r"q_proj.*in_features=128"):
        PeftModel.from_pretrained(tiny_llama(hidden_size=128), saved_adapter)


def test_missing_weights_file_is_reported(tmp_path, saved_adapter):
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    shutil.copy(saved_adapter / "adapter_config.json", incomplete)
    with pytest.raises(FileNotFoundError, match="No adapter weights"):
        PeftModel.from_pretrained(tiny_llama(), incomplete)


def test_truncated_weights_file_is_reported(tmp_path, saved_adapter):
    truncated = tmp_path / "truncated"
    shutil.copytree(saved_adapter, truncated)
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        PeftModel.from_pretrained(tiny_llama(), truncated)


def test_use_lora_lr_scaling_survives_save_and_load(tmp_path):
    config = BLoRAConfig(r=4, balance_factor=2, lora_alpha=8, target_modules=LLAMA_TARGETS, use_lora_lr=True)
    get_peft_model(tiny_llama(), config).save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    scalings = {m.scaling["default"] for m in loaded.modules() if hasattr(m, "bal_A")}
    assert scalings == {2 * 8 / 4}
