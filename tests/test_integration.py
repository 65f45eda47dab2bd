"""Each patch of peft and transformers (peft_balanced.integration): idempotent, and peft's own methods unchanged."""

from __future__ import annotations

import json

import peft.peft_model
import pytest
import safetensors.torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from peft.config import PeftConfigMixin
from peft.utils import PeftType, get_peft_model_state_dict
from tiny import tiny_llama

from peft_balanced import integration
from peft_balanced.checkpoint import atomic_save_safetensors


def _patched_objects() -> tuple:
    return (
        PeftModel.get_nb_trainable_parameters,
        PeftConfigMixin.__dict__["from_json_file"],
        peft.peft_model.safe_save_file,
        tuple(PeftType.__members__),
    )


def test_installing_again_changes_nothing():
    before = _patched_objects()
    integration.install()
    assert _patched_objects() == before


def test_only_the_packages_own_names_are_added_to_peft_types():
    with pytest.raises(ValueError, match=r"'NOT_OURS' is not a PEFT type of peft-balanced.*BLORA, QABLORA"):
        integration.extend_peft_type("NOT_OURS")
    assert "NOT_OURS" not in PeftType.__members__


def test_lora_parameter_count_is_peft_own_count():
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad) > 0
    assert total == sum(p.numel() for p in model.parameters())


def test_adapter_weights_are_written_through_the_atomic_writer():
    assert peft.peft_model.safe_save_file is atomic_save_safetensors


def test_lora_adapter_file_has_the_bytes_safetensors_writes(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "lora")
    reference = tmp_path / "reference.safetensors"
    safetensors.torch.save_file(get_peft_model_state_dict(model), str(reference), metadata={"format": "pt"})
    assert (tmp_path / "lora" / "adapter_model.safetensors").read_bytes() == reference.read_bytes()


def test_a_valid_lora_config_file_loads_as_peft_reads_it(tmp_path):
    config = LoraConfig(r=3, lora_alpha=7, target_modules=["q_proj", "v_proj"])
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, LoraConfig) and loaded.to_dict() == config.to_dict()


def test_invalid_json_in_a_lora_config_names_the_file(tmp_path):
    LoraConfig(r=2, target_modules=["q_proj"]).save_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", ')
    with pytest.raises(ValueError, match=r"adapter_config\.json.*is not valid JSON"):
        PeftConfig.from_pretrained(tmp_path)


def test_an_unknown_peft_type_names_the_file_and_the_known_types(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "NOT_A_METHOD"}))
    with pytest.raises(ValueError, match=r"adapter_config\.json.*unknown peft_type 'NOT_A_METHOD'.*BLORA.*LORA"):
        PeftConfig.from_pretrained(tmp_path)
