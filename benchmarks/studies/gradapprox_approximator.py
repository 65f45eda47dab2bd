"""Does GradApprox's learned gradient approximator predict the true gradients, and what does it save? (issue 4)

    python benchmarks/studies/gradapprox_approximator.py --out OUT [--depths 1,3,5] [--steps 40] [--task strategyqa]

On SmolLM2-135M-Instruct (the package's default offline model) with BIG-bench training examples from ``--data``
(default ``../shared/data/bigbench``), for each approximator depth: a fresh GradApprox adapter (r = ``--r`` on the 7
projections, LoRA initialization so that only the approximator differs) trained with AdamW for ``--steps`` steps
that **all** run full backprop and fit the approximator, so that every step scores the approximator out of sample
before it learns from that batch:

* ``delta_cos``: mean over modules of the cosine between predicted and true output gradients (sampled tokens);
* ``grad_cos``: cosine between the adapter gradients (all modules) those predictions give and the true ones.

Then ``--time-steps`` steps of each kind are timed: plain (forward + backward, no approximator hooks), exact
(forward + backward + approximator fit) and approximated (forward + predicted gradients, no backward). ``K=4 time``
is the time of 4 steps with refresh_every = 4 (1 exact + 3 approximated) relative to 4 plain steps. The approximator
can pay off only if that ratio is well below 1 **and** grad_cos is clearly positive. Prints a table last; writes
``OUT/approximator.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

import torch
from peft import get_peft_model

from peft_balanced import GradApproxConfig
from peft_balanced.demo.data import completion_loss, default_bigbench_root
from peft_balanced.demo.models import LLAMA_PROJECTIONS, load_default_model
from peft_balanced.experimental import GradientApproximation

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "accuracy"))  # BIG-bench data, batches
import harness  # noqa: E402  (benchmarks/accuracy/harness.py)


def timed(device: str, fn) -> float:
    harness.sync(device)
    start = time.perf_counter()
    fn()
    harness.sync(device)
    return time.perf_counter() - start


def measure_depth(base, batches: list[dict], depth: int, args: argparse.Namespace) -> dict:
    """Out-of-sample cosines over ``args.steps`` exact steps, then step times of the three kinds."""
    torch.manual_seed(0)
    config = GradApproxConfig(
        r=args.r, lora_alpha=2 * args.r, target_modules=list(LLAMA_PROJECTIONS), init="lora",
        approximator_depth=depth, approximator_width=args.width, refresh_every=1, approximator_lr=args.approximator_lr,
    )  # fmt: skip
    model = get_peft_model(base, config)
    model.train()
    approx = GradientApproximation(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)

    def update() -> None:
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    losses = []
    for step in range(args.steps):
        batch = batches[step % len(batches)]
        losses.append(approx.step(step, batch, lambda batch=batch: completion_loss(model, batch)).item())
        update()
    history = approx.history[1:]  # the first fit has nothing to score
    times: dict[str, list[float]] = {"plain": [], "exact": [], "approximated": []}
    for i in range(args.time_steps + 1):  # the first round warms up
        batch = batches[(args.steps + i) % len(batches)]

        def plain(batch=batch) -> None:
            completion_loss(model, batch).backward()

        def exact(batch=batch) -> None:
            approx.step(0, batch, lambda: completion_loss(model, batch))

        def approximated(batch=batch) -> None:
            with torch.no_grad(), approx.approximate(batch):
                completion_loss(model, batch)

        for kind, fn in (("plain", plain), ("exact", exact), ("approximated", approximated)):
            seconds = timed(args.device, fn)
            optimizer.zero_grad(set_to_none=True)
            if i:
                times[kind].append(seconds)
    approx.remove()
    base = model.unload()
    median = {kind: statistics.median(values) for kind, values in times.items()}

    def mean_of(key: str, part: slice) -> float:
        values = [h[key] for h in history[part]]
        return sum(values) / len(values)

    return {
        "depth": depth,
        "approximator_params": sum(p.numel() for p in approx.network.parameters()),
        "adapter_params": sum(p.numel() for p in params),
        "losses": losses,
        "history": history,
        "step_seconds": times,
        "median_seconds": median,
        "k4_time_ratio": (median["exact"] + 3 * median["approximated"]) / (4 * median["plain"]),
        "delta_cos_first": mean_of("delta_cosine", slice(0, 5)),
        "delta_cos_last": mean_of("delta_cosine", slice(-5, None)),
        "grad_cos_first": mean_of("grad_cosine", slice(0, 5)),
        "grad_cos_last": mean_of("grad_cosine", slice(-5, None)),
    }, base


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "approximator-out"))
    p.add_argument("--data", default=None, help="BIG-bench root (default: ../shared/data/bigbench)")
    p.add_argument("--task", default="strategyqa")
    p.add_argument("--depths", default="1,3,5")
    p.add_argument("--steps", type=int, default=40, help="exact steps that score and fit the approximator")
    p.add_argument("--time-steps", type=int, default=3, help="timed steps of each kind")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--width", type=int, default=64, help="approximator width")
    p.add_argument("--lr", type=float, default=3e-4, help="adapter AdamW learning rate")
    p.add_argument("--approximator-lr", type=float, default=3e-3)
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32

    model, tokenizer = load_default_model()
    model = model.to(device=args.device, dtype=dtype)
    model.config.use_cache = False
    rows, _ = harness.load_tasks(args.data or default_bigbench_root(), [args.task], dev_limit=1)
    harness.tokenize_train(rows, tokenizer, 256)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    schedule = harness.batch_schedule(len(rows), args.steps + args.time_steps + 1, args.batch_size, seed=0)
    batches = [harness.make_train_batch(rows, idx, pad, args.device) for idx in schedule]

    results = []
    for depth in [int(d) for d in args.depths.split(",")]:
        result, model = measure_depth(model, batches, depth, args)
        results.append(result)
        print(
            f"depth {depth}: delta_cos {result['delta_cos_first']:.3f} -> {result['delta_cos_last']:.3f}, grad_cos "
            f"{result['grad_cos_first']:.3f} -> {result['grad_cos_last']:.3f}, s/step {result['median_seconds']}",
            flush=True,
        )
    meta = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu", "args": vars(args)}
    tmp = out / "approximator.json.tmp"
    tmp.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    tmp.replace(out / "approximator.json")

    print(f"\n{args.task}, batch {args.batch_size}, r = {args.r}, {args.steps} exact steps, device {meta['device']}")
    print("| depth | approximator params | delta_cos first 5 / last 5 | grad_cos first 5 / last 5 | plain s | exact s "
          "| approximated s | K=4 time vs plain |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        m = r["median_seconds"]
        print(
            f"| {r['depth']} | {r['approximator_params']:,} | {r['delta_cos_first']:.3f} / {r['delta_cos_last']:.3f} "
            f"| {r['grad_cos_first']:.3f} / {r['grad_cos_last']:.3f} | {m['plain']:.3f} | {m['exact']:.3f} "
            f"| {m['approximated']:.3f} | {r['k4_time_ratio']:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
