"""GradApprox inside TRL's SFTTrainer and transformers' Trainer: the callback initialises, training proceeds."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from sft import mean, sft_train
from tiny import LLAMA_TARGETS, tiny_llama, tiny_tokenizer
from transformers import Trainer, TrainerState, TrainingArguments

from peft_balanced import GradApproxConfig, GradApproxInitCallback
from peft_balanced.tuners.gradapprox import GradApproxLinear


def sft_run(tmp_path, init: str, steps: int, callbacks: list):
    config = GradApproxConfig(r=4, lora_alpha=16, target_modules=LLAMA_TARGETS, init=init)
    return sft_train(tiny_llama(initializer_range=0.1), config, tmp_path / f"out-{init}", steps, callbacks)


@pytest.fixture(scope="module")
def gradient_run(tmp_path_factory):
    callback = GradApproxInitCallback(num_batches=4, progress=False)
    trainer, losses = sft_run(tmp_path_factory.mktemp("sft"), "gradient", 30, [callback])
    return trainer, losses, callback


def test_sft_trainer_with_the_callback_initialises_from_the_gradient_and_loss_goes_down(gradient_run):
    trainer, losses, callback = gradient_run
    assert callback.report is not None and callback.report.num_batches == 4 and callback.report.num_tokens > 0
    layers = [m for m in trainer.model.modules() if isinstance(m, GradApproxLinear)]
    assert len(layers) == 2 * len(LLAMA_TARGETS)
    assert all(layer.gax_B0["default"].abs().sum() > 0 for layer in layers)  # not LoRA's zero B
    assert mean(losses[-5:]) < 0.7 * mean(losses[:5]), losses


def test_gradient_init_lowers_the_loss_faster_than_lora_init(gradient_run, tmp_path):
    _, gradient_losses, _ = gradient_run
    _, lora_losses = sft_run(tmp_path, "lora", 5, [])
    assert gradient_losses[0] == pytest.approx(lora_losses[0], rel=1e-4)  # same model, same first batch
    assert mean(gradient_losses[1:5]) < 0.9 * mean(lora_losses[1:5]), (gradient_losses[:5], lora_losses)


def test_callback_runs_once(gradient_run):
    trainer, _, callback = gradient_run
    report = callback.report
    callback.on_train_begin(trainer.args, TrainerState(), None, model=trainer.model, train_dataloader=[])
    assert callback.report is report  # a second train() does not re-initialise a trained adapter


def test_sft_trainer_without_the_callback_refuses_to_train_a_gradient_init_adapter(tmp_path):
    with pytest.raises(RuntimeError, match=r"init='gradient'.*GradApproxInitCallback"):
        sft_run(tmp_path, "gradient", 2, [])


def test_trainer_with_explicit_batches(tmp_path):
    tokenizer = tiny_tokenizer()
    rows = [tokenizer(f"{i} plus 1 is {i + 1}.") for i in range(8)]
    data = [{"input_ids": r["input_ids"], "labels": r["input_ids"]} for r in rows]
    batches = [{key: torch.tensor([row[key]]) for key in ("input_ids", "labels")} for row in data[:3]]
    model = get_peft_model(tiny_llama(), GradApproxConfig(r=2, target_modules=["q_proj", "v_proj"]))
    callback = GradApproxInitCallback(batches=batches, num_batches=3, progress=False)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=1, report_to=[], use_cpu=True,
        save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()
    assert callback.report.num_batches == 3
