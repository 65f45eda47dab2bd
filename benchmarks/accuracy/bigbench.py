"""BIG-bench rows for the accuracy harness (harness.py): loading tasks, the select split, tokenizing, batches.

Also what the records count and compare against: the padded tokens of a schedule, the majority-answer accuracy.
harness.py re-exports every name, so ``benchmarks/studies/`` scripts use them as ``harness.load_tasks`` etc.
"""

from __future__ import annotations

import os
import pathlib
import random
from collections import Counter
from collections.abc import Sequence

import torch

from peft_balanced.demo import data


def load_tasks(
    root: str | os.PathLike, tasks: Sequence[str], dev_limit: int | None = None, train_limit: int | None = None
) -> tuple[list[dict], dict[str, list[dict]]]:
    """Train rows of all ``tasks`` (each with its ``task`` name) and the dev rows of each task."""
    root = pathlib.Path(root)
    available = sorted(p.name for p in root.iterdir() if (p / "dev.jsonl").is_file()) if root.is_dir() else []
    missing = [t for t in tasks if t not in available]
    if missing:
        raise ValueError(f"task {missing[0]!r} not found under {root}; available: {', '.join(available) or 'none'}")
    train, dev = [], {}
    for task in tasks:
        train += [{**row, "task": task} for row in data.load_bigbench(root / task, "train", train_limit)]
        dev[task] = [{**row, "task": task} for row in data.load_bigbench(root / task, "dev", dev_limit)]
    return train, dev


def split_select(train: list[dict], per_task: int) -> tuple[list[dict], dict[str, list[dict]]]:
    """Hold ``per_task`` rows of every task out of ``train`` (a fixed draw, the same for every method and seed).

    The held-out "select" rows pick each method's learning rate, so that the dev split, on which results are
    reported, plays no part in any choice. Returns ``(train without them, {task: held-out rows})``.
    """
    keep, select = [], {}
    by_task: dict[str, list[dict]] = {}
    for row in train:
        by_task.setdefault(row["task"], []).append(row)
    for task, rows in by_task.items():
        if per_task >= len(rows):
            raise ValueError(f"cannot hold {per_task} of {len(rows)} {task} train rows out for selection")
        order = list(range(len(rows)))
        random.Random(f"bigbench-select:{task}").shuffle(order)
        held = set(order[:per_task])
        select[task] = [rows[i] for i in sorted(held)] if per_task else []
        keep += [row for i, row in enumerate(rows) if i not in held]
    return keep, {t: rows for t, rows in select.items() if rows}


def tokenize_train(rows: list[dict], tokenizer, max_length: int) -> int:
    """Add ``features`` (prompt + correct choice, prompt masked) to every row; return how many were truncated."""
    truncated = 0
    for row in rows:
        row["features"] = data.tokenize_choice(tokenizer, row["prompt"], row["target"], max_length)
        full = data.tokenize_choice(tokenizer, row["prompt"], row["target"])
        truncated += len(full["input_ids"]) > len(row["features"]["input_ids"])
    return truncated


def batch_schedule(n_rows: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """Row indices of every step: the rows shuffled per epoch by ``seed`` (the same for every method)."""
    order: list[int] = []
    epoch = 0
    while len(order) < steps * batch_size:
        perm = list(range(n_rows))
        random.Random(f"bigbench-train:{seed}:{epoch}").shuffle(perm)
        order += perm
        epoch += 1
    return [order[s * batch_size : (s + 1) * batch_size] for s in range(steps)]


def make_train_batch(rows: list[dict], indices: list[int], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Right-padded batch (padding: attention 0, label -100).

    Not left-padded: on CUDA a left-padded position attends to no key at all, its bf16 attention output is NaN, and
    although no loss reaches it, the NaN spreads into the weight gradients (LoRA's loss was NaN by step 25).
    """
    batch = data.collate([rows[i]["features"] for i in indices], pad_id, "right")
    return {k: v.to(device) for k, v in batch.items()}


def majority_baseline(train: list[dict], dev: dict[str, list[dict]]) -> dict[str, float]:
    """Dev accuracy of always answering the most frequent correct answer text of the task's train split."""
    out = {}
    for task, rows in dev.items():
        counts = Counter(r["target"] for r in train if r["task"] == task)
        out[task] = sum(max(r["choices"], key=lambda c: counts.get(c, 0)) == r["target"] for r in rows) / len(rows)
    return out


def padded_tokens(rows: list[dict], schedule: list[list[int]]) -> int:
    """Tokens the model processes over ``schedule`` (each batch padded to its longest row)."""
    return sum(len(idx) * max(len(rows[i]["features"]["input_ids"]) for i in idx) for idx in schedule)
