"""Precision of a merged QA-BLoRA model on SmolLM2-135M-Instruct: merged vs adapter-attached logits.

Merging QA-BLoRA is exact in real arithmetic (the update is constant on every quantization tile, so it only shifts
each tile's zero point beta), but the new beta is rounded once into its storage dtype. This script measures what
that rounding costs on the real model, for each storage dtype of the scales (alpha) and zero points (beta):

1. Loads SmolLM2-135M-Instruct in float32 (``peft_balanced.demo.models.load_default_model``; nothing is downloaded).
2. For each tile: quantizes a copy (fp16 alpha/beta), trains a QA-BLoRA adapter (all linears but ``lm_head``) with
   AdamW (lr ``--lr``) on the generated ``add`` task, so ``H`` has a realistic magnitude; ``H`` is kept after each of
   ``--steps`` (e.g. 5 and 25: an early, small update and a trained one).
3. For each kept ``H`` and (alpha dtype, beta dtype): quantizes a fresh float32 copy, attaches that ``H``, computes
   the logits of ``--prompts`` held-out prompts, merges (``merge_and_unload``) and computes them again.
   ``rel_err = ||merged - attached|| / ||attached||`` over all positions of all prompts (fp32 compute), plus the
   worst single prompt. For scale, ``int4_vs_fp32`` is the same norm between the attached 4-bit model and the float32
   model with the same adapter added exactly (what 4-bit quantization itself costs).

Prints one table last. CPU, a few minutes on 2 cores:

    .venv/bin/python benchmarks/studies/qablora_merge_error.py
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

import peft_balanced
from peft_balanced.demo.data import completion_loss, format_prompt, make_batch, make_splits
from peft_balanced.demo.models import load_default_model
from peft_balanced.quant import TileInt4Linear, quantize_model

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# (alpha dtype, beta dtype) pairs measured; the first trains the adapter.
PAIRS = [("fp16", "fp16"), ("bf16", "bf16"), ("fp32", "fp32"), ("fp16", "fp32"), ("bf16", "fp32")]


def parse_tile(text: str) -> tuple[int, int]:
    a, b = text.lower().split("x")
    return int(a), int(b)


def adapter_config(tile: tuple[int, int], alpha: float) -> peft_balanced.QABLoRAConfig:
    return peft_balanced.QABLoRAConfig(tile=tile, lora_alpha=alpha, target_modules="all-linear")


def train_adapter(fp_model, tokenizer, tile, args, train) -> tuple[dict[int, dict[str, torch.Tensor]], list[float]]:
    """Train QA-BLoRA on a fp16-alpha/beta copy; return ``{step: adapter state dict}`` for ``args.steps`` and the
    losses."""
    model = quantize_model(copy.deepcopy(fp_model), tile=tile, scale_dtype="float16")
    adapted = get_peft_model(model, adapter_config(tile, args.alpha))
    adapted.train()
    params = [p for p in adapted.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    losses, states = [], {}
    for step in range(max(args.steps)):
        rows = [train[(step * args.batch + i) % len(train)] for i in range(args.batch)]
        batch = make_batch(tokenizer, rows, padding_side="left")
        loss = completion_loss(adapted, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step + 1 in args.steps:
            states[step + 1] = {k: v.detach().clone() for k, v in get_peft_model_state_dict(adapted).items()}
    return states, losses


@torch.no_grad()
def prompt_logits(model, prompts: list[torch.Tensor]) -> list[torch.Tensor]:
    return [model(ids[None]).logits[0].float() for ids in prompts]


def norm_ratio(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> tuple[float, float]:
    """``(||a - e|| / ||e|| over everything, max over prompts of the same ratio)``."""
    diff = sum(float((a.double() - e.double()).square().sum()) for a, e in zip(actual, expected, strict=True))
    ref = sum(float(e.double().square().sum()) for e in expected)
    worst = max(float((a - e).norm() / e.norm()) for a, e in zip(actual, expected, strict=True))
    return (diff / ref) ** 0.5, worst


@torch.no_grad()
def fp_with_adapter(fp_model, adapted) -> torch.nn.Module:
    """The float32 model plus the adapter's exact update ``ΔW`` (for the 4-bit-vs-fp32 reference)."""
    reference = copy.deepcopy(fp_model)
    for name, module in adapted.base_model.model.named_modules():
        if hasattr(module, "get_delta_weight") and hasattr(module, "qab_H"):
            reference.get_submodule(name).weight += module.get_delta_weight("default")
    return reference


def measure(fp_model, state, tile, steps, pair, args, prompts, fp_logits_cache) -> dict:
    scale_dtype, zero_dtype = (DTYPES[p] for p in pair)
    model = quantize_model(copy.deepcopy(fp_model), tile=tile, scale_dtype=scale_dtype, zero_dtype=zero_dtype)
    adapted = get_peft_model(model, adapter_config(tile, args.alpha))
    set_peft_model_state_dict(adapted, state)
    adapted.eval()
    layers = [m for m in adapted.modules() if isinstance(m, TileInt4Linear)]
    zero = torch.cat([m.zero.float().flatten() for m in layers])
    shift = torch.cat([m.get_delta_zero("default").flatten() for m in adapted.modules() if hasattr(m, "qab_H")])
    attached = prompt_logits(adapted, prompts)
    if (tile, steps) not in fp_logits_cache:
        fp_logits_cache[tile, steps] = prompt_logits(fp_with_adapter(fp_model, adapted), prompts)
    int4_err, _ = norm_ratio(attached, fp_logits_cache[tile, steps])
    merged = adapted.merge_and_unload()
    err, worst = norm_ratio(prompt_logits(merged, prompts), attached)
    return {
        "tile": f"{tile[0]}x{tile[1]}",
        "steps": steps,
        "alpha": pair[0],
        "beta": pair[1],
        "bpw": layers[0].bits_per_weight(),
        "rel_err": err,
        "worst_prompt": worst,
        "int4_vs_fp32": int4_err,
        "shift_rms/beta_rms": float(shift.square().mean().sqrt() / zero.square().mean().sqrt()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiles", nargs="+", default=["4x8", "8x8"])
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 25], help="measure H after these steps")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--alpha", type=float, default=1.0, help="QA-BLoRA scaling s (lora_alpha)")
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    start = time.perf_counter()
    fp_model, tokenizer = load_default_model(torch.float32)
    train, held_out = make_splits("add", n_train=max(args.steps) * args.batch, n_eval=args.prompts, seed=args.seed)
    prompts = [torch.tensor(tokenizer(format_prompt(tokenizer, ex), add_special_tokens=False)["input_ids"])
               for ex in held_out]  # fmt: skip
    rows, fp_cache = [], {}
    for tile in map(parse_tile, args.tiles):
        states, losses = train_adapter(fp_model, tokenizer, tile, args, train)
        print(f"tile {tile}: trained {len(losses)} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}", flush=True)
        for steps, state in sorted(states.items()):
            for pair in PAIRS:
                rows.append(measure(fp_model, state, tile, steps, pair, args, prompts, fp_cache))
                print(f"  {steps} steps {pair}: rel_err {rows[-1]['rel_err']:.2e}", flush=True)

    print(
        f"\nSmolLM2-135M-Instruct, fp32 compute, {len(prompts)} held-out 'add' prompts "
        f"({sum(len(p) for p in prompts)} positions); QA-BLoRA all-linear, s={args.alpha}, batch {args.batch}, "
        f"AdamW lr {args.lr}; {time.perf_counter() - start:.0f} s\n"
    )
    header = list(rows[0])
    widths = [max(len(h), 8) for h in header]
    print(" | ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        cells = [f"{v:.2e}" if isinstance(v, float) and k != "bpw" else str(v) for k, v in row.items()]
        print(" | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)))


if __name__ == "__main__":
    main()
