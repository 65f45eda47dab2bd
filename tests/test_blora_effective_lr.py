"""BLoRA's step size against LoRA's: the exact gradient identities behind docs/accuracy.md ("Why Q-BLoRA does not
beat QLoRA here").

For ``y = W x + s · expand_λ(B A pool_λ(x))`` and the full-weight gradient ``G = ∂L/∂W``:
``∂L/∂B = (s/λ) · T_λ(G) · Aᵀ`` and ``∂L/∂A = (s/λ) · Bᵀ · T_λ(G)``, where ``T_λ`` sums ``G`` over λ×λ tiles.
LoRA's are the same with λ = 1. So BLoRA is LoRA on the tile-summed gradient, scaled by 1/λ, with an A whose
Kaiming init is √λ larger (fan-in D_in/λ); the ratio of the first SGD step's loss decrease is
``ρ_λ = ‖T_λ(G)‖² / ‖G‖²`` (≈ 1 when G has no structure within tiles, λ² when it is tile-constant).
"""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import peft_balanced


class OneLinear(nn.Module):
    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def tile_sum(g: torch.Tensor, lam: int) -> torch.Tensor:
    """``T_λ(G)``: ``(D_out, D_in) -> (D_out/λ, D_in/λ)``, the sum over every λ×λ tile."""
    d_out, d_in = g.shape
    return g.reshape(d_out // lam, lam, d_in // lam, lam).sum(dim=(1, 3))


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(5, 7, 32, dtype=torch.float64, generator=gen),
            torch.randn(5, 7, 48, dtype=torch.float64, generator=gen))  # fmt: skip


def _blora_grads(lam: int, r: int = 2, alpha: float = 6.0, seed: int = 0, use_lora_lr: bool = False):
    torch.manual_seed(seed)
    config = peft_balanced.BLoRAConfig(
        r=r, balance_factor=lam, lora_alpha=alpha, target_modules=["proj"], init_weights=False, use_lora_lr=use_lora_lr
    )
    model = get_peft_model(OneLinear(32, 48), config)
    layer = model.base_model.model.proj
    layer.base_layer.weight.requires_grad_(True)
    x, target = _inputs(seed)
    model.double()
    loss = (model(x) * target).sum()
    loss.backward()
    a, b = layer.bal_A["default"].weight, layer.bal_B["default"].weight
    return layer.base_layer.weight.grad, a, b, alpha / r


@pytest.mark.parametrize("lam", [1, 2, 4])
def test_blora_b_gradient_is_the_tile_summed_weight_gradient_times_a_transposed_over_lambda(lam):
    g, a, b, s = _blora_grads(lam)
    torch.testing.assert_close(b.grad, (s / lam) * tile_sum(g, lam) @ a.detach().T, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("lam", [1, 2, 4])
def test_blora_a_gradient_is_b_transposed_times_the_tile_summed_weight_gradient_over_lambda(lam):
    g, a, b, s = _blora_grads(lam)
    torch.testing.assert_close(a.grad, (s / lam) * b.detach().T @ tile_sum(g, lam), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("lam", [1, 2])
def test_use_lora_lr_up_to_lambda_two_gives_the_gradients_loras_form_on_the_tile_summed_gradient(lam):
    g, a, b, s = _blora_grads(lam, use_lora_lr=True)  # s = α/r, without the 1/λ of the average pool
    torch.testing.assert_close(b.grad, s * tile_sum(g, lam) @ a.detach().T, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a.grad, s * b.detach().T @ tile_sum(g, lam), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("lam", [4, 8])
def test_use_lora_lr_above_lambda_two_scales_the_gradients_by_two_not_by_lambda(lam):
    g, a, b, s = _blora_grads(lam, use_lora_lr=True)
    torch.testing.assert_close(b.grad, (2 * s / lam) * tile_sum(g, lam) @ a.detach().T, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a.grad, (2 * s / lam) * b.detach().T @ tile_sum(g, lam), rtol=1e-10, atol=1e-12)


def test_blora_with_balance_one_has_lora_gradients_for_the_same_weights():
    g, a, b, s = _blora_grads(1, seed=3)
    torch.manual_seed(3)
    lora = get_peft_model(OneLinear(32, 48), LoraConfig(r=2, lora_alpha=6.0, target_modules=["proj"],
                                                        init_lora_weights=False))  # fmt: skip
    lora.double()
    layer = lora.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(a)
        layer.lora_B["default"].weight.copy_(b)
    x, target = _inputs(3)
    (lora(x) * target).sum().backward()
    torch.testing.assert_close(layer.lora_B["default"].weight.grad, b.grad)
    torch.testing.assert_close(layer.lora_A["default"].weight.grad, a.grad)


def test_tile_sum_keeps_the_energy_of_an_incoherent_gradient_and_multiplies_a_tile_constant_one_by_lambda_squared():
    lam = 4
    torch.manual_seed(0)
    noise = torch.randn(512, 512, dtype=torch.float64)
    rho_noise = tile_sum(noise, lam).square().sum() / noise.square().sum()
    constant = torch.randn(128, 128, dtype=torch.float64).repeat_interleave(lam, 0).repeat_interleave(lam, 1)
    rho_constant = tile_sum(constant, lam).square().sum() / constant.square().sum()
    assert rho_noise == pytest.approx(1.0, abs=0.05)  # 16384 tiles: the estimate's spread is ~0.011
    assert rho_constant.item() == pytest.approx(lam**2)
    assert math.isclose(rho_constant.item() / lam**2, 1.0)  # the share of G a tile-constant update can follow
