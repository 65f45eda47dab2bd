"""Which balance factor λ suits a model: how much of the full fine-tuning gradient a λ-tile update can follow.

A balanced adapter's update ``ΔW = s · expand_λ(B A pool_λ(x))`` is constant on λ×λ tiles of ``W`` (λ outputs × λ
inputs). For the full-weight gradient ``G = ∂L/∂W`` of a projection (``(D_out, D_in)``, summed over the batches) and
``T_λ(G)``, its sums over λ×λ tiles:

- ``ρ_λ = ‖T_λ(G)‖² / ‖G‖²`` is the ratio of BLoRA's first SGD step's loss decrease to LoRA's at the same lr
  (tests/test_blora_effective_lr.py): ≈ 1 when neighbouring channels are unrelated, λ² when ``G`` is tile-constant;
- ``share_λ = ρ_λ / λ²`` is the part of ‖G‖² that any tile-constant update (BLoRA, QA-BLoRA) can follow at all;
- ``locality_λ = ρ_λ / ρ_λ(shuffled)``, against the same ``G`` with its rows and columns randomly permuted: how much
  better pooling neighbours is than pooling random channels (1: no locality to exploit).

The paper (BLoRA, balanced low-rank adaptation) picks λ by hand per model family; :func:`probe_balance` measures it.
``G`` is taken from the layers' inputs and output gradients (``G = Σ dyᵀ x``), so 16-bit, bitsandbytes NF4 and
tile-INT4 bases are probed alike, without unfreezing or dequantizing any weight.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .utils import LLAMA_PROJECTIONS
from .validation import check_positive_int, check_positive_number

__all__ = ["BalanceProbe", "ProjectionProbe", "Recommendation", "probe_balance", "tile_energy_ratio"]

#: Optimal lr of Q-BLoRA over LoRA's, as measured in docs/accuracy.md (AdamW, SmolLM2-135M, 3 tasks, lr grid
#: 3e-4 to 1e-2): λ = 2, 4 and 8 all chose 3e-3, inside the grid, where LoRA chose 1e-3.
MEASURED_LR_MULTIPLIER: dict[int, float] = {2: 3.0, 4: 3.0, 8: 3.0}


def tile_energy_ratio(g: torch.Tensor, factor: int) -> float:
    """``ρ = ‖T_λ(G)‖² / ‖G‖²`` for ``G: (D_out, D_in)``, both sizes multiples of ``factor``."""
    d_out, d_in = g.shape
    tiles = g.reshape(d_out // factor, factor, d_in // factor, factor).sum(dim=(1, 3))
    return float(tiles.double().square().sum() / g.double().square().sum())


@dataclass(frozen=True)
class ProjectionProbe:
    """One projection: ``‖G‖²`` and, per factor dividing both of its sizes, ``ρ`` and ``ρ`` of the shuffled ``G``."""

    name: str
    shape: tuple[int, int]
    energy: float
    rho: Mapping[int, float]
    rho_shuffled: Mapping[int, float]


@dataclass(frozen=True)
class Recommendation:
    """``method`` is ``"blora"`` (with ``balance_factor``) or ``"lora"``; ``reason`` gives the numbers that decided."""

    method: str
    balance_factor: int
    lr_multiplier: float | None
    reason: str


@dataclass(frozen=True)
class BalanceProbe:
    """The probe's numbers; aggregates over projections weight each by its ``‖G‖²`` (a sum of energies)."""

    projections: Sequence[ProjectionProbe]
    factors: tuple[int, ...]
    min_locality: float = 1.5
    recommendation: Recommendation = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "recommendation", self._recommend())

    def _sum(self, factor: int, which: str) -> tuple[float, float]:
        rows = [p for p in self.projections if factor in p.rho]
        energy = sum(p.energy for p in rows)
        return sum(p.energy * getattr(p, which)[factor] for p in rows), energy

    def rho(self, factor: int, shuffled: bool = False) -> float:
        """Energy-weighted ``ρ_λ`` over the projections that ``factor`` divides."""
        total, energy = self._sum(factor, "rho_shuffled" if shuffled else "rho")
        return total / energy if energy else float("nan")

    def share(self, factor: int) -> float:
        """Part of the gradient's energy a λ-tile update can follow: ``ρ_λ / λ²``."""
        return self.rho(factor) / factor**2

    def locality(self, factor: int) -> float:
        """``ρ_λ / ρ_λ(shuffled)``: 1 when neighbouring channels are no more related than random ones."""
        return self.rho(factor) / self.rho(factor, shuffled=True)

    def _recommend(self) -> Recommendation:
        balanced = [f for f in self.factors if f > 1 and any(f in p.rho for p in self.projections)]
        numbers = ", ".join(
            f"λ={f}: locality {self.locality(f):.2f}, share {100 * self.share(f):.1f} %" for f in balanced
        )
        local = [f for f in balanced if self.locality(f) >= self.min_locality]
        if not local:
            return Recommendation(
                "lora",
                1,
                None,
                f"neighbouring channels are no more related than random ones (locality < {self.min_locality} at every "
                f"λ; {numbers}): a balanced adapter has no structure to exploit here, use LoRA / QLoRA.",
            )
        factor = max(local)
        multiplier = MEASURED_LR_MULTIPLIER.get(factor)
        lr = f"{multiplier:g}x LoRA's lr (measured)" if multiplier else "lr multiplier not measured for this λ"
        lr += ", or LoRA's lr with BLoRAConfig(use_lora_lr=True)"
        return Recommendation(
            "blora",
            factor,
            multiplier,
            f"λ={factor} is the largest factor whose locality reaches {self.min_locality} ({numbers}); {lr}.",
        )

    def table(self) -> str:
        """Markdown: one row per factor (ρ, shuffled ρ, locality, share), then the recommendation."""
        lines = ["| λ | ρ | ρ shuffled | locality | share |", "|---:|---:|---:|---:|---:|"]
        for f in self.factors:
            lines.append(
                f"| {f} | {self.rho(f):.3f} | {self.rho(f, True):.3f} | {self.locality(f):.2f} | "
                f"{100 * self.share(f):.1f} % |"
            )
        rec = self.recommendation
        lines.append(
            f"\nRecommendation: {rec.method}" + (f", λ={rec.balance_factor}" if rec.method == "blora" else "")
        )
        lines.append(rec.reason)
        return "\n".join(lines)


def _default_loss(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    loss = model(**batch).loss
    if loss is None:
        raise ValueError("probe_balance: the model returned no loss; give batches with 'labels' (or pass loss_fn).")
    return loss


def _targets(model: nn.Module, target_modules: Iterable[str]) -> dict[str, nn.Module]:
    wanted = set(target_modules)
    found = {
        name: m
        for name, m in model.named_modules()
        if name.rsplit(".", 1)[-1] in wanted and hasattr(m, "in_features") and hasattr(m, "out_features")
    }
    if not found:
        raise ValueError(
            f"probe_balance: no linear layer of the model is named one of {sorted(wanted)}; pass target_modules "
            "with the last component of the projections' names (e.g. 'q_proj')."
        )
    return found


def _weight_gradients(model: nn.Module, modules: dict[str, nn.Module], batches, loss_fn) -> dict[str, torch.Tensor]:
    """``{name: Σ_batches dyᵀ x}`` in float32: each module's weight gradient, from its inputs and output gradients."""
    grads = {name: torch.zeros(m.out_features, m.in_features) for name, m in modules.items()}

    def capture(name: str):
        def hook(_module, args, output):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()

            def accumulate(dy: torch.Tensor) -> None:
                grads[name].add_((dy.reshape(-1, dy.shape[-1]).float().T @ x).cpu())

            if output.requires_grad:
                output.register_hook(accumulate)

        return hook

    def inputs_require_grad(_module, _args, output):
        return output.requires_grad_(True)

    handles = [m.register_forward_hook(capture(name)) for name, m in modules.items()]
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None:
        handles.append(embeddings.register_forward_hook(inputs_require_grad))
    was_training = model.training
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    for param in trainable:  # no weight gradients: G comes from the hooks, and the user's .grad stay untouched
        param.requires_grad_(False)
    count = 0
    try:
        for batch in batches:
            loss_fn(model, batch).backward()
            count += 1
    finally:
        for handle in handles:
            handle.remove()
        for param in trainable:
            param.requires_grad_(True)
        model.train(was_training)
    if count == 0:
        raise ValueError("probe_balance: batches is empty; give at least one batch.")
    return grads


def probe_balance(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    factors: Sequence[int] = (1, 2, 4, 8),
    target_modules: Iterable[str] = LLAMA_PROJECTIONS,
    loss_fn: Callable[[nn.Module, Mapping[str, Any]], torch.Tensor] = _default_loss,
    min_locality: float = 1.5,
    seed: int = 0,
) -> BalanceProbe:
    """Measure ``ρ_λ``, its shuffled control and the recommendation, from the gradient over ``batches``.

    ``batches``: dicts the model takes (``input_ids``, ``attention_mask``, ``labels``), or anything ``loss_fn`` takes.
    The model is left as it was (weights, ``requires_grad``, ``.grad``, train / eval mode); it runs in eval mode.
    """
    factors = tuple(check_positive_int("probe_balance factors", f) for f in factors)
    check_positive_number("probe_balance min_locality", min_locality)
    modules = _targets(model, target_modules)
    grads = _weight_gradients(model, modules, batches, loss_fn)
    generator = torch.Generator().manual_seed(seed)
    projections = []
    for name, g in grads.items():
        rows, cols = torch.randperm(g.shape[0], generator=generator), torch.randperm(g.shape[1], generator=generator)
        shuffled = g[rows][:, cols]
        fits = [f for f in factors if g.shape[0] % f == 0 and g.shape[1] % f == 0]
        projections.append(
            ProjectionProbe(
                name=name,
                shape=tuple(g.shape),
                energy=float(g.double().square().sum()),
                rho={f: tile_energy_ratio(g, f) for f in fits},
                rho_shuffled={f: tile_energy_ratio(shuffled, f) for f in fits},
            )
        )
    return BalanceProbe(projections=projections, factors=factors, min_locality=min_locality)
