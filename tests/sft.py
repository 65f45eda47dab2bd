"""A tiny TRL SFTTrainer run shared by the tuners' TRL tests."""

from __future__ import annotations

from datasets import Dataset
from tiny import tiny_tokenizer
from trl import SFTConfig, SFTTrainer


def copy_task(n: int = 64) -> Dataset:
    """Short texts with a fixed pattern that a tiny model learns in a few dozen steps."""
    return Dataset.from_dict({"text": [f"{i % 10} plus 1 is {i % 10 + 1}." for i in range(n)]})


def sft_train(model, peft_config, output_dir, steps: int = 30, callbacks: list | None = None, trainer_cls=SFTTrainer):
    """Train ``model`` with ``SFTTrainer(peft_config=...)`` on the copy task; return the trainer and logged losses."""
    args = SFTConfig(
        output_dir=str(output_dir),
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
        disable_tqdm=True,
    )
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=copy_task(),
        processing_class=tiny_tokenizer(),
        peft_config=peft_config,
        callbacks=callbacks,
    )
    trainer.train()
    return trainer, [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def mean(values: list[float]) -> float:
    return sum(values) / len(values)
