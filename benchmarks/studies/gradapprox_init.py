"""How well GradApprox's streamed gradient sketch finds the exact gradient's top singular subspace (issue 4, part 1).

    python benchmarks/studies/gradapprox_init.py [--layers 0 15 29] [--batches 4] [--r 8]     # CPU, a few minutes

On SmolLM2-135M-Instruct (the package's default offline model), for the 7 projections of ``--layers``:
1. the exact full-weight gradients ``G`` of those modules, summed over ``--batches`` batches of short texts;
2. ``init_gradapprox`` with several (oversampling, sketch passes) settings on the same batches;
3. per module: principal angles between the adapter's ``A`` rows and ``G``'s top-r right singular vectors, between
   ``B``'s columns and singular vectors r+1..2r on the left (the default direction ``ArB2r``), and the share of
   ``G``'s top-2r energy the initialised subspaces capture.
Prints one table row per setting last (median and max angle in degrees, minimum and mean captured energy).
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from peft import get_peft_model

from peft_balanced import GradApproxConfig, init_gradapprox
from peft_balanced.demo.models import LLAMA_PROJECTIONS, load_default_model
from peft_balanced.tuners.gradapprox import GradApproxLinear


def text_batches(tokenizer, n_batches: int, batch_size: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Short arithmetic / fact sentences, tokenised with padding; padded positions carry label -100."""
    rng = random.Random(seed)
    batches = []
    for _ in range(n_batches):
        texts = []
        for _ in range(batch_size):
            a, b = rng.randint(1, 99), rng.randint(1, 99)
            texts.append(
                rng.choice(
                    [
                        f"Question: what is {a} plus {b}? Answer: {a + b}.",
                        f"The capital of France is Paris. {a} times {b} is {a * b}.",
                        f"Translate 'cat' to French: chat. {a} minus {b} equals {a - b}.",
                    ]
                )
            )
        encoded = tokenizer(texts, return_tensors="pt", padding=True)
        labels = encoded["input_ids"].clone()
        labels[encoded["attention_mask"] == 0] = -100
        batches.append({**encoded, "labels": labels})
    return batches


def exact_gradients(model, batches, layers: list[int]) -> dict[str, torch.Tensor]:
    """``{module name: G (float64)}`` for the projections of ``layers``, summed over ``batches``."""
    model.train()
    for name, param in model.named_parameters():
        wanted = any(f"layers.{i}." in name for i in layers) and any(f"{t}.weight" in name for t in LLAMA_PROJECTIONS)
        param.requires_grad_(wanted)
    for batch in batches:
        model(**batch).loss.backward()
    grads = {
        n.removesuffix(".weight"): p.grad.double().clone() for n, p in model.named_parameters() if p.grad is not None
    }
    for param in model.parameters():
        param.grad = None
        param.requires_grad_(False)
    model.eval()
    return grads


def principal_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Principal angles in degrees between the column spaces of ``a`` and ``b``."""
    qa, qb = torch.linalg.qr(a.double())[0], torch.linalg.qr(b.double())[0]
    return torch.rad2deg(torch.arccos(torch.linalg.svdvals(qa.T @ qb).clamp(max=1)))


def add_study_arguments(parser: argparse.ArgumentParser, r: int) -> None:
    """``--layers``, ``--batches``, ``--batch-size`` and ``--r`` (default ``r``): the gradient studies' set-up."""
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 15, 29])
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--r", type=int, default=r)


def load_study(args: argparse.Namespace) -> tuple[torch.nn.Module, list[dict[str, torch.Tensor]]]:
    """SmolLM2 (the package's default offline model) and ``args.batches`` text batches, seeded."""
    torch.manual_seed(0)
    model, tokenizer = load_default_model()
    return model, text_batches(tokenizer, args.batches, args.batch_size)


def main() -> None:
    parser = argparse.ArgumentParser()
    add_study_arguments(parser, r=8)
    args = parser.parse_args()
    model, batches = load_study(args)
    grads = exact_gradients(model, batches, args.layers)
    r = args.r
    rows = []
    for oversampling, passes in ((16, 1), (16, 2), (16, 3), (8, 2)):
        config = GradApproxConfig(
            r=r,
            target_modules=list(LLAMA_PROJECTIONS),
            layers_to_transform=args.layers,
            oversampling=oversampling,
            sketch_passes=passes,
        )
        peft_model = get_peft_model(model, config)
        start = time.perf_counter()
        init_gradapprox(peft_model, batches, num_batches=len(batches), progress=False)
        seconds = time.perf_counter() - start
        energies, angles_a, angles_b = [], [], []
        for module in peft_model.modules():
            if not isinstance(module, GradApproxLinear):
                continue
            g = grads[module.module_name]
            u, s, vh = torch.linalg.svd(g, full_matrices=False)
            a = module.gax_A["default"].weight.detach().double()
            b = module.gax_B["default"].weight.detach().double()
            a_unit, b_unit = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=0, keepdim=True)
            captured = ((b_unit.T @ g) ** 2).sum() + ((g @ a_unit.T) ** 2).sum()
            energies.append(float(captured / (s[: 2 * r] ** 2).sum()))
            angles_a.append(principal_angles(a.T, vh[:r].T))
            angles_b.append(principal_angles(b, u[:, r : 2 * r]))
        all_a, all_b = torch.cat(angles_a), torch.cat(angles_b)
        rows.append(
            f"| {oversampling} | {passes} | {len(energies)} | {seconds:.1f} | {all_a.median():.2f} / {all_a.max():.2f} "
            f"| {all_b.median():.2f} / {all_b.max():.2f} | {min(energies):.4f} / {sum(energies) / len(energies):.4f} |"
        )
        print(rows[-1], flush=True)
        model = peft_model.unload()
    print(f"\nSmolLM2-135M-Instruct, layers {args.layers}, r={r}, {args.batches} batches x {args.batch_size}")
    print("| oversampling | passes | modules | init s | A angle median / max (deg) | B angle median / max (deg) "
          "| captured energy min / mean |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
