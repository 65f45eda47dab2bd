"""Trainer integration of the gradient approximator: ``GradApproxTrainer`` and ``with_gradient_approximator``."""

from __future__ import annotations

from contextlib import contextmanager
from functools import cache
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from .approximator import GradientApproximation
from .config import GradApproxConfig


class GradApproxTrainerMixin:
    """Mix into a ``transformers.Trainer`` subclass (e.g. TRL's ``SFTTrainer``): when the model's active adapter is a
    :class:`~peft_balanced.GradApproxConfig` with ``approximator_depth > 0``, exact steps run as usual and train the
    approximator, and the other steps run the forward pass only, with predicted adapter gradients. Otherwise it
    trains exactly like the base class. The approximator's metrics (``gradapprox/delta_cosine``,
    ``gradapprox/grad_cosine``, ``gradapprox/approximator_loss``, ``gradapprox/approximated_steps``) join the
    trainer's logs; the approximator itself is ``trainer.gradient_approximation``.
    """

    gradient_approximation: GradientApproximation | None = None
    _gradapprox_checked = False
    _gradapprox_approximated = 0

    def _gradient_approximation(self, model: nn.Module) -> GradientApproximation | None:
        if not self._gradapprox_checked:
            self._gradapprox_checked = True
            peft_model = self.accelerator.unwrap_model(model)
            config = getattr(peft_model, "peft_config", {}).get(getattr(peft_model, "active_adapter", None))
            if isinstance(config, GradApproxConfig) and config.approximator_depth > 0:
                if self.args.world_size > 1:
                    raise NotImplementedError(
                        "The GradApprox gradient approximator runs on one process only (predicted gradients are not "
                        f"all-reduced); this run has world_size={self.args.world_size}. Use approximator_depth=0."
                    )
                self.gradient_approximation = GradientApproximation(peft_model)
        return self.gradient_approximation

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        approximation = self._gradient_approximation(model)
        if approximation is None:
            return super().training_step(model, inputs, num_items_in_batch)
        if approximation.is_exact_step(self.state.global_step):
            with approximation.exact(inputs):
                loss = super().training_step(model, inputs, num_items_in_batch)
            approximation.fit()
            return loss
        self._gradapprox_approximated += 1
        with torch.no_grad(), approximation.approximate(inputs), self._no_backward():
            return super().training_step(model, inputs, num_items_in_batch)

    @contextmanager
    def _no_backward(self):
        """Run the base ``training_step`` (input preparation, loss scaling, logging value) without its backward."""
        backward = self.accelerator.backward
        self.accelerator.backward = lambda loss, **kwargs: None
        try:
            yield
        finally:
            self.accelerator.backward = backward

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self.gradient_approximation is not None and "loss" in logs:
            logs.update(self.gradient_approximation.pop_metrics())
            logs["gradapprox/approximated_steps"] = self._gradapprox_approximated
        super().log(logs, *args, **kwargs)


class GradApproxTrainer(GradApproxTrainerMixin, Trainer):
    """``transformers.Trainer`` with the GradApprox gradient approximator (see :class:`GradApproxTrainerMixin`)."""


@cache
def with_gradient_approximator(trainer_cls: type[Trainer]) -> type[Trainer]:
    """A subclass of ``trainer_cls`` (any ``transformers.Trainer`` subclass, e.g. TRL's ``SFTTrainer``) that runs the
    GradApprox gradient approximator: ``with_gradient_approximator(SFTTrainer)(model=..., peft_config=...)``."""
    if not (isinstance(trainer_cls, type) and issubclass(trainer_cls, Trainer)):
        raise TypeError(f"with_gradient_approximator needs a transformers.Trainer subclass, got {trainer_cls!r}.")
    if issubclass(trainer_cls, GradApproxTrainerMixin):
        return trainer_cls
    return type(f"GradApprox{trainer_cls.__name__}", (GradApproxTrainerMixin, trainer_cls), {})
