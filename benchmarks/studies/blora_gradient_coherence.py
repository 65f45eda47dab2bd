"""How much of the full fine-tuning gradient a balanced adapter can follow (SmolLM2-135M, BIG-bench train batches).

    python benchmarks/studies/blora_gradient_coherence.py --batches 4 --batch-size 8     # CPU, about a minute
    python benchmarks/studies/blora_gradient_coherence.py --out docs/results/gradient-coherence.json

For every Llama projection, the full-weight gradient ``G = ∂L/∂W`` summed over the batches, and for each λ
``ρ_λ = ‖T_λ(G)‖² / ‖G‖²`` where ``T_λ`` sums G over λ×λ tiles (see tests/test_blora_effective_lr.py):

- ρ_λ is the ratio of BLoRA's first SGD step's loss decrease to LoRA's at the same lr, rank and alpha (both with
  Kaiming-initialised A, B = 0): ∂L/∂B = (s/λ) T_λ(G) Aᵀ with A's entries √λ larger than LoRA's.
- ρ_λ / λ² is the share of ‖G‖² that any tile-constant update (BLoRA, QA-BLoRA) can follow at all; LoRA at full
  rank follows all of it.
- "shuffled" repeats ρ_λ after a random permutation of G's rows and columns: what ρ is when neighbouring
  channels are unrelated. A ρ near the shuffled value means that pooling neighbours gains nothing over pooling
  random channels, i.e. the model's channels have no locality a balanced adapter could exploit.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "accuracy"))  # BIG-bench data, batches
import harness  # noqa: E402  (benchmarks/accuracy/harness.py)

from peft_balanced.probe import tile_energy_ratio  # noqa: E402  (the library's one home of this math)

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="strategyqa,social_iqa,reasoning_about_colored_objects")
    parser.add_argument("--data", default=None, help="BIG-bench root (default: ../shared/data/bigbench)")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lambdas", default="2,4,8")
    parser.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = parser.parse_args(argv)

    from peft_balanced.demo import data
    from peft_balanced.demo.models import load_default_model

    root = args.data or data.default_bigbench_root()
    train, _ = harness.load_tasks(root, args.tasks.split(","), dev_limit=1)
    model, tokenizer = load_default_model(dtype=torch.float32)
    harness.tokenize_train(train, tokenizer, 256)
    model.train()
    for p in model.parameters():
        p.requires_grad_(p.dim() == 2)
    schedule = harness.batch_schedule(len(train), args.batches, args.batch_size, seed=0)
    for indices in schedule:
        batch = harness.make_train_batch(train, indices, tokenizer.pad_token_id, "cpu")
        data.completion_loss(model, batch).backward()
    lambdas = [int(x) for x in args.lambdas.split(",")]
    gen = torch.Generator().manual_seed(0)
    rows: dict[str, dict[str, list[float]]] = {}
    for name, module in model.named_modules():
        kind = name.rsplit(".", 1)[-1]
        if kind not in PROJECTIONS:
            continue
        g = module.weight.grad.double()
        shuffled = g[torch.randperm(g.shape[0], generator=gen)][:, torch.randperm(g.shape[1], generator=gen)]
        entry = rows.setdefault(kind, {})
        for lam in lambdas:
            entry.setdefault(f"rho{lam}", []).append(tile_energy_ratio(g, lam))
            entry.setdefault(f"shuffled{lam}", []).append(tile_energy_ratio(shuffled, lam))
    head = " | ".join(f"ρ{lam} (shuffled) | share λ={lam}" for lam in lambdas)
    print(f"| projection | {head} |\n|---|" + "---|---|" * len(lambdas))
    table = {}
    for kind in PROJECTIONS:
        means = {k: statistics.fmean(v) for k, v in rows[kind].items()}
        table[kind] = means
        cells = " | ".join(
            f"{means[f'rho{lam}']:.2f} ({means[f'shuffled{lam}']:.2f}) | {100 * means[f'rho{lam}'] / lam**2:.1f} %"
            for lam in lambdas
        )
        print(f"| {kind} | {cells} |")
    if args.out:
        path = pathlib.Path(args.out)
        tmp = path.with_suffix(".partial")
        tmp.write_text(json.dumps({"settings": vars(args), "mean_over_layers": table}, indent=1))
        os.replace(tmp, path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
