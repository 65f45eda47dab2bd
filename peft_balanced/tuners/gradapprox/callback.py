"""``GradApproxInitCallback``: gradient initialization inside ``transformers.Trainer`` / TRL's ``SFTTrainer``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.utils import logging

from .estimate import GradApproxInitReport, init_gradapprox

logger = logging.get_logger(__name__)


class GradApproxInitCallback(TrainerCallback):
    """Run :func:`peft_balanced.init_gradapprox` when training starts, before the first optimizer step.

    Example::

        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                             peft_config=GradApproxConfig(r=8, target_modules="all-linear"),
                             callbacks=[GradApproxInitCallback(num_batches=8)])
        trainer.train()

    Args:
        batches: batches of model inputs with ``labels``; default: the trainer's train dataloader (with data-parallel
            training every process sketches its own shard and the sketches are summed).
        num_batches: batches to stream (default: the adapter config's ``estimation_batches``).
        adapter_name: adapter to initialise (default: the active adapter).
        progress: show a progress bar (on the local main process only).

    It runs once: a second ``train()`` call, or resuming from a checkpoint (``global_step > 0``), skips it. The
    result is kept in ``self.report``.
    """

    def __init__(
        self,
        batches: Iterable[Mapping[str, Any]] | None = None,
        num_batches: int | None = None,
        adapter_name: str | None = None,
        progress: bool = True,
    ) -> None:
        self.batches = batches
        self.num_batches = num_batches
        self.adapter_name = adapter_name
        self.progress = progress
        self.report: GradApproxInitReport | None = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.report is not None or state.global_step > 0:
            logger.info("GradApproxInitCallback: adapter already initialised or training resumed; skipping.")
            return
        batches = self.batches if self.batches is not None else kwargs.get("train_dataloader")
        model = kwargs.get("model")
        if batches is None or model is None:
            raise ValueError("GradApproxInitCallback needs the trainer's model and train dataloader (or `batches`).")
        self.report = init_gradapprox(
            model,
            batches,
            num_batches=self.num_batches,
            progress=self.progress and state.is_local_process_zero,
            adapter_name=self.adapter_name,
        )
        logger.info(
            f"GradApprox init: {self.report.num_batches} batches, {self.report.num_tokens} label tokens, "
            f"{len(self.report.singular_values)} modules."
        )
