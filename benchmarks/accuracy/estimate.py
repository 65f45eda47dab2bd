"""Time estimates of the accuracy benchmark's runs: assumed speeds, replaced by measured ones as runs finish.

``estimate_seconds`` is what ``accuracy.py`` prints before each run and what ``--time-budget`` compares against.
"""

from __future__ import annotations

import math

import harness
from harness import Bench, Method

# Assumed speeds until a run of the same kind has been measured. CUDA: the H100 fact (~35k tok/s training SmolLM2
# with LoRA), NF4 / INT4 bases at 0.7x, a fixed cost per step (launch- and Python-bound at ~1.1k tokens per step),
# scoring (forward only) at 4x the training rate plus a cost per batch. CPU: measured here (2 cores, --smoke).
DEFAULT_RATES = {
    "cuda": {"dense": 35_000.0, "nf4": 24_500.0, "int4": 24_500.0, "step": 0.04, "eval": 140_000.0,
             "eval_batch": 0.02, "setup": 5.0},
    "cpu": {"dense": 400.0, "nf4": 300.0, "int4": 300.0, "step": 0.0, "eval": 800.0, "eval_batch": 0.0,
            "setup": 3.0},
}  # fmt: skip


def eval_tokens(bench: Bench) -> tuple[int, int]:
    """Tokens and scoring batches of one dev evaluation (every choice of every example)."""
    if "eval_tokens" not in bench.meta:
        from peft_balanced.demo.data import tokenize_choice

        lengths = [
            len(tokenize_choice(bench.tokenizer, row["prompt"], choice)["input_ids"])
            for rows in bench.dev.values()
            for row in rows
            for choice in row["choices"]
        ]
        bench.meta["eval_tokens"] = (sum(lengths), math.ceil(len(lengths) / bench.settings.eval_batch_size))
    return bench.meta["eval_tokens"]


def unshared_step_seconds(rates: dict, base: str, tokens_per_step: float) -> float:
    """Seconds of one training step on ``base`` by the fixed rates alone (a launch cost plus tokens at the base's
    speed), before any measurement or GPU sharing."""
    return rates["step"] + tokens_per_step / rates[base]


def step_seconds(rates: dict, base: str, tokens_per_step: float) -> float:
    """Seconds of one training step on ``base``: measured, or assumed (times the ``slowdown`` measured on another
    base)."""
    assumed = unshared_step_seconds(rates, base, tokens_per_step) * rates.get("slowdown", 1.0)
    return rates.get(f"measured_{base}", assumed)


def estimate_seconds(group: list[Method], bench: Bench, seed: int) -> float:
    """Seconds one training run of ``group`` should take: setup, training (GradApprox: plus two sketch passes over
    its estimation batches) and one dev evaluation per curve point and per merge. Measured speeds replace the
    assumed ones once a run of the same base format (training) or any run (evaluation, setup) has finished."""
    s, rates, method = bench.settings, bench.rates, group[0]
    evals = 1  # step 0 of a curve, or the one evaluation at the end
    if method.adapter != "none":
        evals += math.ceil(s.steps / s.eval_every) if s.eval_every else 0
        evals += sum(m.finish != "none" for m in group)
    tokens, batches = eval_tokens(bench)
    per_eval = rates.get("measured_eval", batches * rates["eval_batch"] + tokens / rates["eval"])
    seconds = rates.get("measured_setup", rates["setup"]) + evals * per_eval
    if method.adapter != "none":
        schedule = harness.batch_schedule(len(bench.train_rows), s.steps, s.batch_size, seed)
        tokens_per_step = harness.padded_tokens(bench.train_rows, schedule) / s.steps
        per_step = step_seconds(rates, method.base, tokens_per_step)
        steps = s.steps + {"gradapprox": 2, "lora_ga": 1}.get(method.adapter, 0) * s.estimation_batches
        seconds += steps * per_step
    return seconds


def calibrate(bench: Bench, record: dict) -> None:
    """Keep the seconds per training step, per evaluation and for setup measured in ``record``, and how much slower
    than assumed its training ran (``slowdown``: GPU sharing slows every base alike, so the bases not measured yet are
    estimated at their assumed speed times it)."""
    rates = bench.rates
    train_only = record["train_seconds"] - record["init_seconds"]
    steps = len(record["train_loss"])
    if record["padded_tokens"] and train_only > 0 and steps:
        measured = train_only / steps
        rates[f"measured_{record['base']}"] = measured
        rates["slowdown"] = measured / unshared_step_seconds(rates, record["base"], record["padded_tokens"] / steps)
    if record["eval_seconds"]:
        rates["measured_eval"] = record["eval_seconds"] / (len(record["eval_curve"]) + (record["finish"] != "none"))
    rates["measured_setup"] = record["setup_seconds"]
