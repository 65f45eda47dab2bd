"""Faults: a ``Trainer`` run that stops after a checkpoint and is resumed from it (``resume_from_checkpoint``) ends
with exactly the adapter of a run that was never interrupted."""

from __future__ import annotations

import pytest
import torch
from trainer_run import TokenDataset, adapter_state, make_trainer, peft_model, training_args
from transformers import TrainerCallback

from peft_balanced import GradApproxInitCallback

STEPS, STOP_AT = 6, 3


class StopAt(TrainerCallback):
    """Simulates a crash right after the checkpoint of step ``step`` was written."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def _callbacks(method: str) -> list:
    return [GradApproxInitCallback(progress=False)] if method == "gradapprox" else []


def _train(method: str, output_dir, extra_callbacks=(), resume_from=None):
    model = peft_model(method)
    args = training_args(str(output_dir), batch_size=4, steps=STEPS, save_strategy="steps", save_steps=STOP_AT)
    trainer = make_trainer(model, args, TokenDataset(), callbacks=_callbacks(method) + list(extra_callbacks))
    trainer.train(resume_from_checkpoint=resume_from)
    return model, trainer


@pytest.mark.parametrize("method", ["blora", "gradapprox"])
def test_resumed_run_ends_with_the_uninterrupted_runs_adapter(method, tmp_path):
    uninterrupted, _ = _train(method, tmp_path / "full")
    expected = adapter_state(uninterrupted)

    stopped, trainer = _train(method, tmp_path / "crashed", extra_callbacks=[StopAt(STOP_AT)])
    assert trainer.state.global_step == STOP_AT
    checkpoint = tmp_path / "crashed" / f"checkpoint-{STOP_AT}"
    assert (checkpoint / "adapter_model.safetensors").is_file()
    assert any(not torch.equal(adapter_state(stopped)[k], expected[k]) for k in expected)  # not finished yet

    resumed, trainer = _train(method, tmp_path / "crashed", resume_from=str(checkpoint))
    assert trainer.state.global_step == STEPS
    got = adapter_state(resumed)
    assert got.keys() == expected.keys() and expected
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6, msg=key)
