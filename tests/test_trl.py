"""TRL's SFTTrainer builds and trains BLoRA / Q-BLoRA from ``peft_config=`` like LoRA."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from tiny import LLAMA_TARGETS, tiny_llama, tiny_tokenizer
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
from trl import SFTConfig, SFTTrainer

from peft_balanced import BLoRAConfig, BLoRALinear


def copy_task(n: int = 64) -> Dataset:
    """Short texts with a fixed pattern that a tiny model learns in a few dozen steps."""
    return Dataset.from_dict({"text": [f"{i % 10} plus 1 is {i % 10 + 1}." for i in range(n)]})


def train(model, tmp_path, steps: int = 30) -> tuple[SFTTrainer, list[float]]:
    args = SFTConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        max_length=32,
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=copy_task(),
        processing_class=tiny_tokenizer(),
        peft_config=BLoRAConfig(r=4, balance_factor=2, lora_alpha=16, target_modules=LLAMA_TARGETS),
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return trainer, losses


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


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
