"""A tiny transformers ``Trainer`` run on fixed-length token sequences, shared by the resume and distributed tests
(``tests/distributed_worker.py`` imports it in each process). Nothing is downloaded."""

from __future__ import annotations

import torch
from peft import get_peft_model
from tiny import LLAMA_TARGETS, tiny_llama
from transformers import Trainer, TrainingArguments

import peft_balanced


class TokenDataset(torch.utils.data.Dataset):
    """``n`` random sequences of ``length`` tokens (labels = inputs): every example has the same number of loss
    tokens, so a mean over one batch of 2b equals the mean of two batches of b."""

    def __init__(self, n: int = 32, length: int = 12, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(4, 128, (n, length), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.ids[index]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def adapter_config(method: str):
    if method == "blora":
        return peft_balanced.BLoRAConfig(r=2, balance_factor=2, lora_alpha=4, target_modules=LLAMA_TARGETS)
    if method == "gradapprox":
        return peft_balanced.GradApproxConfig(
            r=2, lora_alpha=4, target_modules=LLAMA_TARGETS, estimation_batches=2, oversampling=4
        )
    raise ValueError(method)


def peft_model(method: str, seed: int = 0):
    torch.manual_seed(seed)
    return get_peft_model(tiny_llama(seed=seed), adapter_config(method))


def training_args(output_dir: str, batch_size: int, steps: int, **overrides) -> TrainingArguments:
    kwargs = dict(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=5e-3,
        lr_scheduler_type="linear",
        warmup_steps=0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def adapter_state(model) -> dict[str, torch.Tensor]:
    """Every adapter tensor (trainable weights and persistent buffers such as GradApprox's A0 / B0)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".bal_" in k or ".gax_" in k}


def make_trainer(model, args: TrainingArguments, dataset, callbacks=None) -> Trainer:
    return Trainer(model=model, args=args, train_dataset=dataset, callbacks=callbacks)
