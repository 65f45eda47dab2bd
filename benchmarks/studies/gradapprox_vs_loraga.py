"""GradApprox's initialization against peft's LoRA-GA on the same model and batches: direction and scale (issue 22).

    python benchmarks/studies/gradapprox_vs_loraga.py [--layers 0 15 29] [--batches 4] [--r 16] [--alpha 32]   # CPU

Both start a rank-``r`` adapter from the top ``2r`` singular vectors of the weight gradient ``G`` (direction
``ArB2r``: ``A`` from right vectors 1..r, ``B`` from left vectors r+1..2r) and keep the model's function unchanged at
step 0 (peft subtracts ``s·B0 A0`` from the base weight; GradApprox keeps a frozen ``B0 A0``). Per projection of
``--layers`` of SmolLM2-135M-Instruct this prints, for each method, the Frobenius norms of ``A`` and ``B`` and the
size of the initial product ``‖s·B A‖_F / ‖W‖_F``, and the principal angles between the two methods' ``A`` row spaces
and ``B`` column spaces. The table (medians over layers per projection) is printed last.
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
from gradapprox_init import add_study_arguments, load_study, principal_angles
from peft import LoraConfig, LoraGAConfig, get_peft_model, preprocess_loraga
from torch import nn

from peft_balanced import GradApproxConfig, init_gradapprox
from peft_balanced.demo.models import LLAMA_PROJECTIONS
from peft_balanced.tuners.gradapprox import GradApproxLinear

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module name -> (A (r, D_in), B (D_out, r)), float64


def gradapprox_init_factors(model: nn.Module, batches: list[dict], r: int, alpha: float, layers: list[int]) -> Factors:
    """GradApprox's initial ``A``, ``B`` (its defaults: stable scale, γ 16) on a copy of ``model``."""
    config = GradApproxConfig(
        r=r, lora_alpha=alpha, target_modules=list(LLAMA_PROJECTIONS), layers_to_transform=layers, lora_dropout=0.0
    )
    peft_model = get_peft_model(copy.deepcopy(model), config)
    init_gradapprox(peft_model, batches, num_batches=len(batches), progress=False)
    return {
        m.module_name: (m.gax_A["default"].weight.detach().double(), m.gax_B["default"].weight.detach().double())
        for m in peft_model.modules()
        if isinstance(m, GradApproxLinear)
    }


def lora_ga_init_factors(model: nn.Module, batches: list[dict], r: int, alpha: float, layers: list[int]) -> Factors:
    """peft's LoRA-GA initial ``A``, ``B`` (its defaults: ``LoraGAConfig()``) on a copy of ``model``."""
    model = copy.deepcopy(model)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=list(LLAMA_PROJECTIONS),
        layers_to_transform=layers,
        lora_dropout=0.0,
        init_lora_weights="lora_ga",
        lora_ga_config=LoraGAConfig(),
    )

    def train_step() -> None:
        for batch in batches:
            model(**batch).loss.backward()

    model.train()
    preprocess_loraga(model, config, train_step)
    peft_model = get_peft_model(model, config)
    factors = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            key = name.removeprefix("base_model.model.")
            factors[key] = (
                module.lora_A["default"].weight.detach().double(),
                module.lora_B["default"].weight.detach().double(),
            )
    return factors


def compare(ours: Factors, peft: Factors, model: nn.Module, scaling: float) -> list[dict]:
    """Per module: norms of each method's factors, ``‖s·B A‖_F / ‖W‖_F`` (``W`` of ``model``, which both initialized
    copies of), and the median principal angles (degrees) between the two ``A`` row spaces and the two ``B`` column
    spaces."""
    rows = []
    for name in sorted(ours):
        (a1, b1), (a2, b2) = ours[name], peft[name]
        w = model.get_submodule(name).weight.double().norm()
        rows.append({
            "module": name,
            "A_norm": (float(a1.norm()), float(a2.norm())),
            "B_norm": (float(b1.norm()), float(b2.norm())),
            "product_vs_W": (float(scaling * (b1 @ a1).norm() / w), float(scaling * (b2 @ a2).norm() / w)),
            "A_angle": float(principal_angles(a1.T, a2.T).median()),
            "B_angle": float(principal_angles(b1, b2).median()),
        })  # fmt: skip
    return rows


def table(rows: list[dict]) -> str:
    """Medians over layers per projection, GradApprox / peft LoRA-GA."""
    lines = [
        "| projection | ‖A‖_F ours / peft | ‖B‖_F ours / peft | ‖s·BA‖/‖W‖ ours / peft | A angle (deg) | B angle (deg) |",
        "|---|---|---|---|---:|---:|",
    ]
    for projection in LLAMA_PROJECTIONS:
        group = [row for row in rows if row["module"].endswith(projection)]
        if not group:
            continue

        def pair(key: str, group: list[dict] = group) -> str:
            return " / ".join(f"{statistics.median(row[key][i] for row in group):.3g}" for i in (0, 1))

        angles = [statistics.median(row[key] for row in group) for key in ("A_angle", "B_angle")]
        lines.append(
            f"| {projection} | {pair('A_norm')} | {pair('B_norm')} | {pair('product_vs_W')} "
            f"| {angles[0]:.1f} | {angles[1]:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_study_arguments(parser, r=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    args = parser.parse_args()
    model, batches = load_study(args)
    ours = gradapprox_init_factors(model, batches, args.r, args.alpha, args.layers)
    peft = lora_ga_init_factors(model, batches, args.r, args.alpha, args.layers)
    rows = compare(ours, peft, model, args.alpha / args.r)
    print(f"\nSmolLM2-135M-Instruct, layers {args.layers}, r={args.r}, alpha={args.alpha}, "
          f"{args.batches} batches x {args.batch_size}; medians over the layers")  # fmt: skip
    print(table(rows))


if __name__ == "__main__":
    main()
