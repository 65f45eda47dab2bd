"""GradApprox gradient initialization: the streamed sketch against the exact gradient, invariants, bad input."""

from __future__ import annotations

import pytest
import torch
from peft import PeftConfig, get_peft_model
from tiny import LLAMA_TARGETS, tiny_llama
from torch.utils.data import DataLoader

from peft_balanced import BLoRAConfig, GradApproxConfig, init_gradapprox
from peft_balanced.tuners.gradapprox import GradApproxLinear

R = 4


def token_batches(n: int = 8, batch_size: int = 4, length: int = 16, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(0, 128, (batch_size, length), generator=generator)
        batches.append({"input_ids": ids, "labels": ids.clone()})
    return batches


def base_model():
    return tiny_llama(initializer_range=0.1)


def adapted(**overrides):
    kwargs = dict(r=R, target_modules=LLAMA_TARGETS)
    kwargs.update(overrides)
    return get_peft_model(base_model(), GradApproxConfig(**kwargs))


def gradapprox_layers(model) -> dict[str, GradApproxLinear]:
    return {m.module_name: m for m in model.modules() if isinstance(m, GradApproxLinear)}


@pytest.fixture(scope="module")
def exact_gradients() -> dict[str, torch.Tensor]:
    """The full gradient G: (D_out, D_in) of every targeted weight over token_batches(), in float64."""
    model = base_model().train()
    for name, param in model.named_parameters():
        param.requires_grad_(any(f"{t}.weight" in name for t in LLAMA_TARGETS))
    for batch in token_batches():
        model(**batch).loss.backward()
    return {n.removesuffix(".weight"): p.grad.double() for n, p in model.named_parameters() if p.grad is not None}


def principal_angles_deg(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Principal angles (degrees) between the column spans of ``a`` and ``b``."""
    qa, qb = torch.linalg.qr(a.double())[0], torch.linalg.qr(b.double())[0]
    return torch.rad2deg(torch.arccos(torch.linalg.svdvals(qa.T @ qb).clamp(max=1.0)))


def captured_energy(layer: GradApproxLinear, grad: torch.Tensor) -> float:
    """First-order loss decrease of LoRA-GA's first step with these factors, relative to exact LoRA-GA (1 = exact).

    With orthonormalised ``A`` rows and ``B`` columns, ``<B Bᵀ G + G Aᵀ A, G> / Σ_{i<=2r} σ_i²``.
    """
    a = layer.gax_A["default"].weight.detach().double()
    b = layer.gax_B["default"].weight.detach().double()
    a, b = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=0, keepdim=True)
    best = (torch.linalg.svdvals(grad)[: 2 * R] ** 2).sum()
    return float(((b.T @ grad) ** 2).sum() + ((grad @ a.T) ** 2).sum()) / float(best)


def test_full_width_sketch_recovers_the_exact_singular_subspaces(exact_gradients):
    model = adapted(oversampling=1000, sketch_passes=1)  # k = min(D_in, D_out): the sketch is exact
    report = init_gradapprox(model, token_batches(), progress=False)
    for name, layer in gradapprox_layers(model).items():
        u, s, vh = torch.linalg.svd(exact_gradients[name])
        a, b = layer.gax_A["default"].weight.detach(), layer.gax_B["default"].weight.detach()
        assert principal_angles_deg(a.T, vh[:R].T).max() < 1.0, name  # A: top-r right singular vectors
        assert principal_angles_deg(b, u[:, R : 2 * R]).max() < 1.0, name  # B: the next r left singular vectors
        torch.testing.assert_close(report.singular_values[name].double(), s[: 2 * R], rtol=1e-3, atol=0)


def test_default_sketch_captures_nearly_all_of_exact_lora_ga(exact_gradients):
    """Random tiny models have flat gradient spectra (σ_r/σ_{r+1} down to 1.01), the hard case for sketching."""
    model = adapted()
    init_gradapprox(model, token_batches(), progress=False)
    energies = {n: captured_energy(layer, exact_gradients[n]) for n, layer in gradapprox_layers(model).items()}
    assert min(energies.values()) > 0.97, energies


def test_three_passes_find_the_top_r_subspace_within_a_few_degrees(exact_gradients):
    model = adapted(sketch_passes=3)
    init_gradapprox(model, token_batches(), progress=False)
    for name, layer in gradapprox_layers(model).items():
        vh = torch.linalg.svd(exact_gradients[name])[2]
        angles = principal_angles_deg(layer.gax_A["default"].weight.detach().T, vh[:R].T)
        assert angles.max() < 10.0, (name, angles)
        assert captured_energy(layer, exact_gradients[name]) > 0.99, name


def test_first_sgd_step_follows_the_rank_2r_part_of_the_full_gradient(exact_gradients):
    """With init_scale='gd', one SGD step moves s·B A by −lr·(B̂B̂ᵀG + G ÂᵀÂ) to first order (LoRA-GA)."""
    model = adapted(init_scale="gd", oversampling=1000, sketch_passes=1)
    batches = token_batches()
    init_gradapprox(model, batches, progress=False)
    layer = gradapprox_layers(model)["model.layers.0.mlp.down_proj"]
    a, b = layer.gax_A["default"].weight.detach().double(), layer.gax_B["default"].weight.detach().double()
    lr = 1e-4
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for batch in batches:
        model(**batch).loss.backward()
    optimizer.step()
    grad = exact_gradients["model.layers.0.mlp.down_proj"]
    scale = (R / 16) ** 2  # a and b carry 1/s each: B̂B̂ᵀ = B Bᵀ / (1/s)²
    expected = -lr * (b @ b.T @ grad + grad @ a.T @ a) / scale
    torch.testing.assert_close(
        layer.get_delta_weight("default").double(), expected, rtol=0, atol=1e-3 * expected.abs().max().item()
    )


def test_output_is_bit_exactly_unchanged_by_init(input_ids):
    with torch.no_grad():
        reference = base_model()(input_ids).logits
    model = adapted()
    init_gradapprox(model, token_batches(2), num_batches=2, progress=False)
    layer = gradapprox_layers(model)["model.layers.0.self_attn.q_proj"]
    assert layer.gax_B["default"].weight.abs().sum() > 0  # not the LoRA zero init any more
    torch.testing.assert_close(layer.gax_A0["default"], layer.gax_A["default"].weight.detach(), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, reference, rtol=0, atol=0)
    assert not model.base_model.model.training  # modes restored module by module


def test_init_leaves_no_gradient_and_restores_requires_grad_and_keeps_parameter_objects():
    model = adapted()
    params_before = {n: p for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.train()
    init_gradapprox(model, token_batches(2), num_batches=2, progress=False)
    assert model.training
    for name, param in model.named_parameters():
        assert param is params_before[name] and param.requires_grad == flags[name] and param.grad is None, name
    assert all(layer.probe is None for layer in gradapprox_layers(model).values())


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_init(use_reentrant):
    plain, checkpointed = adapted(), adapted()
    checkpointed.gradient_checkpointing_enable({"use_reentrant": use_reentrant})
    if use_reentrant:  # what Trainer / TRL do for adapters with reentrant checkpointing
        checkpointed.enable_input_require_grads()
    for model in (plain, checkpointed):
        init_gradapprox(model, token_batches(2), num_batches=2, progress=False)
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_a_dataloader_is_streamed_and_the_report_counts_batches_and_tokens():
    rows = [{"input_ids": b["input_ids"][0], "labels": b["labels"][0]} for b in token_batches(12)]
    model = adapted(estimation_batches=3)
    report = init_gradapprox(model, DataLoader(rows, batch_size=4), progress=False)
    assert report.num_batches == 3 and report.num_tokens == 3 * 4 * 16
    assert set(report.singular_values) == set(gradapprox_layers(model))


def test_running_out_of_batches_warns_and_uses_what_there_is():
    with pytest.warns(UserWarning, match="only 2 of the 5 requested batches"):
        report = init_gradapprox(adapted(), token_batches(2), num_batches=5, progress=False)
    assert report.num_batches == 2


@pytest.mark.parametrize(
    ("batches", "error", "message"),
    [
        ([], ValueError, "yielded no batch"),
        ([{"input_ids": torch.zeros(1, 4, dtype=torch.long)}], ValueError, r"batch 0 has no 'labels'.*input_ids"),
        ([torch.zeros(1, 4, dtype=torch.long)], TypeError, "batch 0 is a Tensor"),
        (token_batches(1)[0], TypeError, "single dict"),
    ],
)
def test_bad_batches_are_rejected(batches, error, message):
    with pytest.raises(error, match=message):
        init_gradapprox(adapted(), batches, progress=False)


def test_adapter_that_was_trained_is_not_reinitialised():
    model = adapted()
    layer = gradapprox_layers(model)["model.layers.1.mlp.up_proj"]
    with torch.no_grad():
        layer.gax_B["default"].weight.add_(0.1)
    with pytest.raises(ValueError, match=r"changed since its initialization.*layers\.1\.mlp\.up_proj"):
        init_gradapprox(model, token_batches(1), num_batches=1, progress=False)


def test_rank_too_large_for_gradient_init_names_the_module():
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.q_proj.*2\*r=80.*in_features=64"):
        adapted(r=40)
    adapted(r=40, init="lora")  # LoRA-style init has no such limit


@pytest.mark.parametrize(
    ("model_factory", "error", "message"),
    [
        (lambda: adapted(init="lora"), ValueError, "init='lora'"),
        (lambda: base_model(), TypeError, "expects a PeftModel"),
        (
            lambda: get_peft_model(base_model(), BLoRAConfig(r=2, target_modules=["q_proj"])),
            ValueError,
            "not a GradApprox adapter",
        ),
    ],
)
def test_models_without_a_gradient_initialised_adapter_are_rejected(model_factory, error, message):
    with pytest.raises(error, match=message):
        init_gradapprox(model_factory(), token_batches(1), num_batches=1, progress=False)


def test_num_batches_must_be_positive():
    with pytest.raises(ValueError, match="num_batches must be a positive integer"):
        init_gradapprox(adapted(), token_batches(1), num_batches=0, progress=False)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 0}, "r must be a positive integer"),
        ({"oversampling": -1}, "oversampling must be an integer >= 0"),
        ({"sketch_passes": 0}, "sketch_passes must be a positive integer"),
        ({"estimation_batches": 0}, "estimation_batches must be a positive integer"),
        ({"init": "svd"}, "init must be one of"),
        ({"direction": "BA"}, "direction must be one of"),
        ({"init_scale": "huge"}, "init_scale must be one of"),
        ({"stable_gamma": 0}, "stable_gamma must be > 0"),
        ({"lora_dropout": 1.0}, "lora_dropout must be in"),
        ({"approximator_depth": 6}, "approximator_depth must be an integer in 0..5"),
        ({"refresh_every": 0}, "refresh_every must be a positive integer"),
        ({"approximator_clip": 0}, "approximator_clip must be > 0"),
        ({"approximator_warmup_steps": -1}, "approximator_warmup_steps must be an integer >= 0"),
    ],
)
def test_invalid_config_values_are_rejected_with_the_field_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GradApproxConfig(target_modules=["q_proj"], **kwargs)


def test_generic_peft_config_from_dict_builds_a_gradapprox_config():
    config = GradApproxConfig(r=4, target_modules=["q_proj"], sketch_passes=3, init_scale="gd")
    rebuilt = PeftConfig.from_peft_type(**config.to_dict())
    assert isinstance(rebuilt, GradApproxConfig) and rebuilt.sketch_passes == 3 and rebuilt.init_scale == "gd"
