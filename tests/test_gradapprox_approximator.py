"""The learned gradient approximator: exact steps train it, approximated steps update adapters without a backward."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from sft import mean, sft_train
from tiny import LLAMA_TARGETS, tiny_llama
from trl import SFTTrainer

from peft_balanced import GradApproxConfig
from peft_balanced.experimental import GradApproxTrainerMixin, GradientApproximation, with_gradient_approximator
from peft_balanced.tuners.gradapprox import GradApproxLinear


def config(**overrides) -> GradApproxConfig:
    kwargs = dict(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, init="lora", init_weights=False)
    kwargs.update(approximator_depth=2, refresh_every=3, approximator_warmup_steps=2, approximator_tokens=512)
    kwargs.update(overrides)
    return GradApproxConfig(**kwargs)


def batch(seed: int = 0, size: int = 4, length: int = 12) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 120, (size, length), generator=generator)
    labels = ids.clone()
    labels[:, :3] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def adapted(**overrides):
    model = get_peft_model(tiny_llama(initializer_range=0.1), config(**overrides))
    model.train()
    return model, GradientApproximation(model)


def layers(model) -> list[GradApproxLinear]:
    return [m for m in model.modules() if isinstance(m, GradApproxLinear)]


def test_schedule_runs_warmup_steps_then_every_kth_step_exactly():
    model, approx = adapted(refresh_every=3, approximator_warmup_steps=2)
    approx.step(0, batch())  # the approximator has been fitted once
    assert [approx.is_exact_step(s) for s in range(8)] == [True, True, False, True, False, False, True, False]


@pytest.mark.parametrize("checkpointing", [None, True, False], ids=["no-ckpt", "reentrant", "non-reentrant"])
def test_adapter_gradients_from_captured_output_gradients_equal_autograd(checkpointing):
    model, approx = adapted()
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
        model.enable_input_require_grads()
    approx.step(0, batch(), loss_fn=None)  # exact step; keep its samples by capturing again without fitting
    model.zero_grad()
    with approx.exact(batch(1)):
        model(**batch(1)).loss.backward()
    for layer, samples in zip(layers(model), approx._samples, strict=True):
        grad_a, grad_b = approx._adapter_grads(layer, samples.x, samples.delta)  # all 36 tokens are sampled
        torch.testing.assert_close(grad_a, layer.gax_A["default"].weight.grad, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(grad_b, layer.gax_B["default"].weight.grad, rtol=1e-4, atol=1e-7)


def test_approximated_step_changes_only_adapter_gradients_and_runs_no_backward():
    model, approx = adapted()
    approx.step(0, batch())
    model.zero_grad()
    backward_calls = []
    decoder = model.base_model.model.model.layers[0]
    handle = decoder.register_full_backward_hook(lambda *args: backward_calls.append(1))
    approximator_before = [p.detach().clone() for p in approx.network.parameters()]
    loss = approx.step(2, batch(1))  # step 2 is approximated (warm-up 2, K = 3)
    handle.remove()
    assert not approx.is_exact_step(2) and torch.isfinite(loss) and not backward_calls
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    expected = {name for name, p in model.named_parameters() if "gax_A" in name or "gax_B" in name}
    assert with_grad == expected
    assert all(p.grad.abs().sum() > 0 for name, p in model.named_parameters() if name in expected)
    assert all(torch.equal(a, b) for a, b in zip(approximator_before, approx.network.parameters(), strict=True))


def test_approximated_step_leaves_base_weights_and_initial_buffers_untouched():
    model, approx = adapted()
    approx.step(0, batch())
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "gax_A." not in k and "gax_B." not in k}
    approx.step(2, batch(1))
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())


def test_approximator_fits_a_repeated_batch_and_its_predictions_align_with_true_gradients():
    model, approx = adapted(approximator_lr=3e-3, approximator_depth=3)
    fixed = batch(5)
    for _ in range(60):
        with approx.exact(fixed):
            model(**fixed).loss.backward()
        model.zero_grad()
        approx.fit()
    first, last = approx.metrics[1], approx.metrics[-1]
    assert last["approximator_loss"] < 0.5 * first["approximator_loss"], (first, last)
    assert last["delta_cosine"] > 0.7 and last["grad_cosine"] > 0.7, last


def test_approximated_step_before_any_fit_is_refused():
    model, approx = adapted()
    with pytest.raises(RuntimeError, match="exact steps"):
        with approx.approximate(batch()):
            pass


def test_batches_without_labels_are_rejected_with_their_keys():
    model, approx = adapted()
    with pytest.raises(ValueError, match="needs batches with 'labels'.*input_ids"):
        approx.step(0, {"input_ids": batch()["input_ids"]})


def test_approximator_needs_a_depth():
    model = get_peft_model(tiny_llama(), config(approximator_depth=0))
    with pytest.raises(ValueError, match="approximator_depth=0"):
        GradientApproximation(model)


def test_approximator_is_not_part_of_the_adapter_checkpoint(tmp_path):
    model, approx = adapted()
    approx.step(0, batch())
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert keys and all("gax_" in key for key in keys)


def test_with_gradient_approximator_rejects_non_trainers():
    with pytest.raises(TypeError, match="Trainer subclass"):
        with_gradient_approximator(dict)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    config = GradApproxConfig(
        r=4, lora_alpha=16, target_modules=LLAMA_TARGETS, init="lora", approximator_depth=2, refresh_every=2,
        approximator_warmup_steps=4,
    )  # fmt: skip
    trainer_cls = with_gradient_approximator(SFTTrainer)
    out = tmp_path_factory.mktemp("sft-approx")
    return sft_train(tiny_llama(initializer_range=0.1), config, out, steps=30, trainer_cls=trainer_cls)


def test_sft_trainer_with_the_approximator_skips_backward_on_half_the_steps_and_loss_goes_down(sft_run):
    trainer, losses = sft_run
    assert isinstance(trainer, GradApproxTrainerMixin) and trainer.gradient_approximation is not None
    approximated = [e["gradapprox/approximated_steps"] for e in trainer.state.log_history if "loss" in e]
    assert approximated[-1] == 13  # steps 5, 7, ..., 29 (warm-up 4, then every 2nd step exact)
    assert mean(losses[-5:]) < 0.8 * mean(losses[:5]), losses


def test_sft_trainer_logs_the_cosine_between_predicted_and_true_gradients(sft_run):
    trainer, _ = sft_run
    cosines = [e["gradapprox/delta_cosine"] for e in trainer.state.log_history if "gradapprox/delta_cosine" in e]
    assert cosines and all(-1.0 <= c <= 1.0 for c in cosines)
