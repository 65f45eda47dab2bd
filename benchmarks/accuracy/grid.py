"""The learning-rate grid of ``benchmarks/accuracy/accuracy.py``: each method's choice, whether that choice sits at
an edge of what was tried, and the runs that extend the grid outward until it does not.

A choice at the largest (smallest) lr tried says only that the optimum lies at or beyond it. So after a grid has run,
every method whose choice is at an edge trains at the next lr outward, one half-decade step (1e-3 → 3e-3 → 1e-2;
3e-4 → 1e-4), and again, until its choice is interior, the next lr diverged (then the divergence bounds it), or
``limit`` steps beyond the planned grid were taken. The report marks any choice still at an edge.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from collections.abc import Iterable

from parallel import Job

COMPARABLE = ("batch_size", "r", "lora_alpha", "qablora_alpha", "warmup_steps", "smoke")  # with steps and recipe


def next_lr(lr: float, up: bool) -> float:
    """One half-decade step from ``lr`` on the ladder 1, 3, 10, 30, ... (off the ladder: ×3 or ÷3, 3 digits)."""
    exponent = math.floor(math.log10(lr) + 1e-9)
    mantissa = lr / 10**exponent
    if math.isclose(mantissa, 1.0, rel_tol=1e-6):
        return float(f"{3 * 10 ** (exponent if up else exponent - 1):.3g}")
    if math.isclose(mantissa, 3.0, rel_tol=1e-6):
        return float(f"{10 ** (exponent + 1 if up else exponent):.3g}")
    return float(f"{(lr * 3 if up else lr / 3):.3g}")


def select_score(runs: dict[int, dict]) -> tuple[float, str]:
    """Mean over seeds of the held-out select accuracy (``"select"``), or of dev accuracy when a run has none."""
    if all(r.get("select") for r in runs.values()):
        return sum(r["select"]["mean_accuracy"] for r in runs.values()) / len(runs), "select"
    return sum(r["mean_accuracy"] for r in runs.values()) / len(runs), "dev"


def choose_lr(by_lr: dict[float, dict[int, dict]], diverged: Iterable[float] = ()) -> tuple[float, str]:
    """The lr with the best :func:`select_score` (ties: the smaller lr), and what chose it. An lr at which any seed
    diverged is out of the method's range: it is never chosen."""
    bad = set(diverged)
    usable = {lr: runs for lr, runs in sorted(by_lr.items()) if lr not in bad} or dict(sorted(by_lr.items()))
    if len(usable) == 1:
        return next(iter(usable)), "only lr"
    scores = {lr: select_score(runs) for lr, runs in usable.items()}
    best = max(scores, key=lambda lr: (scores[lr][0], -lr))
    return best, "select split" if all(how == "select" for _, how in scores.values()) else "dev (optimistic)"


def edge_of(tried: Iterable[float], chosen: float) -> str | None:
    """``"top"`` or ``"bottom"`` when ``chosen`` is the largest or smallest of the ``tried`` lrs (diverged ones
    included: a diverged lr above the choice bounds it), ``None`` when interior or when only one lr was tried."""
    tried = set(tried)
    if len(tried) < 2:
        return None
    if math.isclose(chosen, max(tried)):
        return "top"
    if math.isclose(chosen, min(tried)):
        return "bottom"
    return None


def runs_by_lr(records: list[dict], method: str, steps: int, recipe: str, settings: dict | None = None):
    """``({lr: {seed: record}}, {lrs at which a seed diverged})`` of ``method`` at ``steps`` and ``recipe`` (and,
    given ``settings``, only where they agree on :data:`COMPARABLE`)."""
    by_lr: dict[float, dict[int, dict]] = {}
    diverged: set[float] = set()
    for record in records:
        s = record["settings"]
        if record["method"] != method or s["steps"] != steps or s.get("recipe", "default") != recipe:
            continue
        if settings is not None and any(s.get(key) != settings.get(key) for key in COMPARABLE):
            continue
        if record.get("failed"):
            diverged.add(s["lr"])
        else:
            by_lr.setdefault(s["lr"], {})[record["seed"]] = record
    return by_lr, diverged


def extension_jobs(
    records: list[dict], planned: list[Job], settings: dict, limit: int = 3, partial: bool = False
) -> list[Job]:
    """The next runs outward (from what ``records`` tried) for every planned grid (a method group, steps and recipe
    run at two or more lrs) whose choice is at an edge; empty when every choice is interior, bounded by a divergence,
    or ``limit`` half-decade steps beyond the planned grid. A grid with a planned run that has no record yet is not
    judged, unless ``partial``: then it is judged on the seeds that ran at every planned lr (if any), and the
    extension is planned for every seed."""
    grids: dict[tuple, dict[float, set[int]]] = {}
    for job in planned:
        grids.setdefault((job.methods, job.steps, job.recipe), {}).setdefault(job.lr, set()).add(job.seed)
    jobs = []
    for (methods, steps, recipe), planned_lrs in grids.items():
        if len(planned_lrs) < 2:
            continue
        by_lr, diverged = runs_by_lr(records, methods[0], steps, recipe, settings)
        seeds = sorted(set().union(*planned_lrs.values()))
        ran = [sd for sd in seeds if all(sd in by_lr.get(lr, {}) or lr in diverged for lr in planned_lrs)]
        if len(ran) < len(seeds) and not (partial and ran):
            continue
        if len(ran) < len(seeds):  # compare lrs on the same seeds
            by_lr = {
                lr: kept for lr, runs in by_lr.items() if (kept := {sd: r for sd, r in runs.items() if sd in ran})
            }
        tried = set(by_lr) | diverged
        chosen, _ = choose_lr(by_lr, diverged)
        edge = edge_of(tried, chosen)
        if edge is None:
            continue
        lr = next_lr(chosen, up=edge == "top")
        bound = max(planned_lrs) if edge == "top" else min(planned_lrs)
        for _ in range(limit):
            bound = next_lr(bound, up=edge == "top")
        if (lr > bound * 1.001) if edge == "top" else (lr < bound * 0.999):
            continue
        have = by_lr.get(lr, {})
        jobs += [Job(methods, seed, lr, steps, recipe) for seed in seeds if seed not in have and lr not in diverged]
    return jobs


def load_records(out: str | pathlib.Path, missing_ok: bool = False) -> list[dict]:
    """Every record of ``out/results.jsonl`` (none if the file does not exist yet and ``missing_ok``)."""
    path = pathlib.Path(out) / "results.jsonl"
    if not path.is_file():
        if missing_ok:
            return []
        raise FileNotFoundError(f"no results at {path}; run benchmarks/accuracy/accuracy.py --out {out} first")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [json.loads(line) for line in lines]


def chosen_lrs(path: str | os.PathLike) -> dict[str, float]:
    """``{method: lr}`` chosen on the select split from the records at ``path`` (default recipe).

    A method's lr comes from its lr grid: the step count at which it ran the most learning rates (so that later runs
    at the chosen lr, e.g. longer ones, do not enter the choice)."""
    path = pathlib.Path(path)
    folder = path.parent if path.is_file() else path
    records = load_records(folder)
    grids: dict[str, dict[int, tuple[dict, set]]] = {}
    for method, steps in {(r["method"], r["settings"]["steps"]) for r in records}:
        grids.setdefault(method, {})[steps] = runs_by_lr(records, method, steps, "default")
    return {
        name: choose_lr(*max(by_steps.values(), key=lambda grid: len(grid[0])))[0]
        for name, by_steps in grids.items()
        if any(grid[0] for grid in by_steps.values())
    }


def done_jobs(out: pathlib.Path) -> set[tuple]:
    """``(method, seed, lr, steps, recipe)`` of every record (results or divergences) in ``out/results.jsonl``."""
    records = load_records(out, missing_ok=True)
    return {(r["method"], r["seed"], r["settings"]["lr"], r["settings"]["steps"], r["settings"].get("recipe",
            "default")) for r in records}  # fmt: skip
