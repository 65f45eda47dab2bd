"""TRL's SFTTrainer builds and trains BLoRA / Q-BLoRA from ``peft_config=`` like LoRA."""

from __future__ import annotations

import pytest
import torch
from sft import mean, sft_train
from tiny import LLAMA_TARGETS, tiny_llama
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from peft_balanced import BLoRAConfig, BLoRALinear


def train(model, tmp_path):
    config = BLoRAConfig(r=4, balance_factor=2, lora_alpha=16, target_modules=LLAMA_TARGETS)
    return sft_train(model, config, tmp_path / "out")


def test_sft_trainer_trains_blora_and_loss_goes_down(tmp_path):
    trainer, losses = train(tiny_llama(initializer_range=0.1), tmp_path)
    assert any(isinstance(m, BLoRALinear) for m in trainer.model.modules())
    assert mean(losses[-5:]) < 0.7 * mean(losses[:5]), losses


@pytest.mark.slow
def test_sft_trainer_trains_q_blora_on_4bit_model(tmp_path, saved_tiny_llama):
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    model = AutoModelForCausalLM.from_pretrained(saved_tiny_llama, quantization_config=quantization, device_map="cpu")
    trainer, losses = train(model, tmp_path)
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.bfloat16 for p in trainable)  # TRL's cast for quantized models
    assert mean(losses[-5:]) < 0.7 * mean(losses[:5]), losses
