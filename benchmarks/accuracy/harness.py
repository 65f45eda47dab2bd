"""The parts of ``accuracy.py``: methods, the training loop, evaluation, result records (data: bigbench.py).

Kept apart from the command line so that a test can run the harness on a tiny model (tests/test_benchmarks_accuracy.py).

Precision: on CUDA the base model's dense weights are bf16 and NF4 / INT4 bases compute in bf16; adapter weights
stay float32 (peft's ``autocast_adapter_dtype``); no autocast. On CPU everything is float32.
Training data: prompt + correct choice, tokenized exactly as :func:`peft_balanced.demo.data.choice_accuracy` scores it
(:func:`peft_balanced.demo.data.tokenize_choice`), loss on the answer tokens only, no end-of-sequence token.
"""

from __future__ import annotations

import copy
import datetime
import pathlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from bigbench import (  # noqa: F401  (re-exported)
    batch_schedule,
    load_tasks,
    majority_baseline,
    make_train_batch,
    padded_tokens,
    split_select,
    tokenize_train,
)
from finish import append_record, finish, save_atomically, save_dir  # re-exported
from methods import METHODS, RECIPES, Diverged, Method, resolve_methods  # noqa: F401  (re-exported)
from torch import nn

import peft_balanced
from peft_balanced.demo import data
from peft_balanced.demo.models import LLAMA_PROJECTIONS, quantize_linear_nf4
from peft_balanced.experimental import GradientApproximation


@dataclass
class Settings:
    """Training and evaluation settings shared by every method of a call."""

    steps: int = 200
    batch_size: int = 16
    lr: float = 3e-4
    warmup_steps: int = 10
    r: int = 16
    lora_alpha: float = 32.0
    qablora_alpha: float = 1.0
    eval_every: int = 25
    eval_batch_size: int = 64
    max_length: int = 256
    grad_clip: float = 1.0
    schedule: str = "linear"  # "linear": warm-up then linear decay to 0; "constant": warm-up then constant
    recipe: str = "default"
    estimation_batches: int = 8
    refresh_every: int = 4
    device: str = "cpu"
    dtype: str = "float32"
    save: bool = True
    smoke: bool = False
    compile: str = "off"  # "off" or a mode of peft_balanced.compile_for_training (each decoder layer compiled)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


@dataclass
class Bench:
    """Everything a run needs: the pristine base model (on CPU), data, settings and where results go."""

    model: nn.Module
    tokenizer: object
    train_rows: list[dict]
    dev: dict[str, list[dict]]
    settings: Settings
    out: pathlib.Path
    meta: dict = field(default_factory=dict)
    rates: dict = field(default_factory=dict)
    select: dict[str, list[dict]] = field(default_factory=dict)  # held out of train: picks the learning rate


# ----------------------------------------------------------------------------------------------------------------
# models


def build_base(method: Method, bench: Bench) -> nn.Module:
    """A fresh copy of the pristine base on the device, in ``method.base`` format."""
    s = bench.settings
    model = copy.deepcopy(bench.model).to(device=s.device, dtype=s.torch_dtype)
    if method.base == "nf4":
        quantize_linear_nf4(model, compute_dtype=s.torch_dtype, double_quant=True)
    elif method.base == "int4":
        peft_balanced.quantize_model(model, tile=method.tile)
    model.config.use_cache = False
    return model


def adapter_config(method: Method, settings: Settings):
    """The peft config of ``method``: the 7 Llama projections, no dropout, the same rank for every low-rank method."""
    common = dict(target_modules=list(LLAMA_PROJECTIONS), lora_dropout=0.0, task_type="CAUSAL_LM")
    if method.adapter == "lora":
        from peft import LoraConfig

        return LoraConfig(r=settings.r, lora_alpha=settings.lora_alpha, **common)
    if method.adapter == "lora_ga":
        from peft import LoraConfig, LoraGAConfig

        return LoraConfig(
            r=settings.r,
            lora_alpha=settings.lora_alpha,
            init_lora_weights="lora_ga",
            lora_ga_config=LoraGAConfig(),  # peft's defaults: direction ArB2r, stable scale, gamma 16
            **common,
        )
    if method.adapter == "blora":
        return peft_balanced.BLoRAConfig(
            r=settings.r,
            balance_factor=method.balance,
            lora_alpha=settings.lora_alpha * method.alpha_factor,
            use_lora_lr=method.use_lora_lr,
            **common,
        )
    if method.adapter == "qablora":
        return peft_balanced.QABLoRAConfig(
            tile=method.tile,
            lora_alpha=settings.qablora_alpha * method.alpha_factor,
            use_lora_lr=method.use_lora_lr,
            **common,
        )
    if method.adapter == "gradapprox":
        return peft_balanced.GradApproxConfig(
            r=settings.r,
            lora_alpha=settings.lora_alpha,
            init="gradient",
            estimation_batches=settings.estimation_batches,
            approximator_depth=method.depth,
            refresh_every=settings.refresh_every,
            **common,
        )
    raise ValueError(f"method {method.name!r} has no adapter")


def compile_training(peft_model: nn.Module, method: Method, settings: Settings) -> None:
    """Compile ``peft_model``'s decoder layers for training when ``settings.compile`` is a mode (the speed benchmark's
    path). Batches vary in length: dynamic shapes. peft's bitsandbytes LoRA layers (QLoRA) break the graph, so they
    compile between the breaks; every other method must compile whole."""
    if settings.compile == "off":
        return
    whole = not (method.adapter == "lora" and method.base == "nf4")
    peft_balanced.compile_for_training(peft_model, mode=settings.compile, dynamic=True, fullgraph=whole)


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------------------------
# evaluation and training


def evaluate(model: nn.Module, bench: Bench, split: dict[str, list[dict]] | None = None) -> dict:
    """Accuracy on every task of ``split`` (default: dev; length-normalized log-likelihood of each choice), their
    mean and the pooled accuracy."""
    split = bench.dev if split is None else split
    rows = [row for task_rows in split.values() for row in task_rows]
    start = time.perf_counter()
    _, preds = data.choice_accuracy(
        model, bench.tokenizer, rows, batch_size=bench.settings.eval_batch_size, return_predictions=True
    )
    per_task, correct, pos = {}, {}, 0
    for task, task_rows in split.items():
        hits = [int(p == r["answer"]) for p, r in zip(preds[pos : pos + len(task_rows)], task_rows, strict=True)]
        per_task[task] = sum(hits) / len(hits)
        correct[task] = "".join(map(str, hits))
        pos += len(task_rows)
    return {
        "mean_accuracy": sum(per_task.values()) / len(per_task),
        "pooled_accuracy": sum(sum(map(int, c)) for c in correct.values()) / len(rows),
        "dev_accuracy": per_task,
        "correct": correct,
        "seconds": time.perf_counter() - start,
    }


class Stopwatch:
    """Training wall-clock: runs only between :meth:`start` and :meth:`stop`, synchronizing the device at both."""

    def __init__(self, device: str) -> None:
        self.device, self.total, self._since = device, 0.0, None

    def start(self) -> None:
        sync(self.device)
        self._since = time.perf_counter()

    def stop(self) -> float:
        if self._since is not None:
            sync(self.device)
            self.total += time.perf_counter() - self._since
            self._since = None
        return self.total


def lr_factor(step: int, total: int, warmup: int, schedule: str = "linear") -> float:
    """Linear warm-up over ``warmup`` steps, then linear decay to 0 at ``total`` (``"linear"``) or constant."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    return max(0.0, 1.0 - (step - warmup) / max(1, total - warmup))


def estimation_batches(bench: Bench, seed: int) -> list[dict[str, torch.Tensor]]:
    """The first ``estimation_batches`` training batches of ``seed``'s schedule (what gradient inits estimate from)."""
    s = bench.settings
    pad = bench.tokenizer.pad_token_id if bench.tokenizer.pad_token_id is not None else bench.tokenizer.eos_token_id
    schedule = batch_schedule(len(bench.train_rows), s.steps, s.batch_size, seed)
    return [make_train_batch(bench.train_rows, idx, pad, s.device) for idx in schedule[: s.estimation_batches]]


def preprocess_lora_ga(model: nn.Module, config, bench: Bench, seed: int) -> float:
    """peft's LoRA-GA gradient estimate on ``model`` (before ``get_peft_model``) over the same batches GradApprox
    estimates from; returns its seconds (they count as training time)."""
    from peft import preprocess_loraga

    batches = estimation_batches(bench, seed)

    def train_step() -> None:
        for batch in batches:
            data.completion_loss(model, batch).backward()

    clock = Stopwatch(bench.settings.device)
    clock.start()
    preprocess_loraga(model, config, train_step)
    return clock.stop()


def train(
    peft_model: nn.Module,
    method: Method,
    bench: Bench,
    seed: int,
    log: Callable[[str], None],
    init_seconds: float = 0.0,
) -> dict:
    """AdamW on the adapter over ``settings.steps`` batches; dev evaluations at step 0 and every ``eval_every`` steps
    (``eval_every`` 0: once, at the end).

    Returns the train-loss curve, the eval curve (step, training seconds so far, accuracies), the training time
    (a gradient init included: GradApprox's here, LoRA-GA's ``init_seconds`` before; evaluations excluded) and token
    counts.
    """
    s = bench.settings
    pad = bench.tokenizer.pad_token_id if bench.tokenizer.pad_token_id is not None else bench.tokenizer.eos_token_id
    schedule = batch_schedule(len(bench.train_rows), s.steps, s.batch_size, seed)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0)
    clock = Stopwatch(s.device)
    clock.total = init_seconds
    peft_model.train()
    if method.adapter == "gradapprox":
        batches = estimation_batches(bench, seed)
        clock.start()
        peft_balanced.init_gradapprox(peft_model, batches, progress=False)
        init_seconds = clock.stop()
    approximation = GradientApproximation(peft_model) if method.depth else None
    curve: list[dict] = []
    losses: list[torch.Tensor] = []
    final: dict = {}

    def checkpoint(step: int) -> None:
        result = evaluate(peft_model, bench)
        curve.append({"step": step, "train_seconds": round(clock.total, 3), **_short(result)})
        final.update(result)
        log(f"    step {step:>4}: dev mean {result['mean_accuracy']:.3f}  ({clock.total:.1f} s training)")

    if s.eval_every:  # a curve starts at step 0; with evaluation at the end only, the final point is all
        checkpoint(0)
    clock.start()
    for step, indices in enumerate(schedule):
        for group in optimizer.param_groups:
            group["lr"] = s.lr * lr_factor(step, s.steps, min(s.warmup_steps, s.steps), s.schedule)
        batch = make_train_batch(bench.train_rows, indices, pad, s.device)
        if approximation is None:
            loss = data.completion_loss(peft_model, batch)
            loss.backward()
        else:  # exact (forward + backward + approximator fit) or approximated (forward only) step
            loss = approximation.step(step, batch, lambda batch=batch: data.completion_loss(peft_model, batch))
        if s.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        done = step + 1
        if done == s.steps or (s.eval_every and done % s.eval_every == 0):
            clock.stop()
            if not torch.isfinite(torch.stack(losses)).all():
                raise Diverged(f"{method.name}: non-finite training loss by step {done}")
            checkpoint(done)
            if done < s.steps:
                clock.start()
    rows = bench.train_rows
    return {
        "train_loss": [round(v, 5) for v in torch.stack(losses).float().tolist()],
        "eval_curve": curve,
        "final": final,
        "train_seconds": round(clock.total, 3),
        "init_seconds": round(init_seconds, 3),
        "eval_seconds": round(sum(c["seconds"] for c in curve), 3),
        "approximator": approximation.history if approximation is not None else None,
        "padded_tokens": padded_tokens(rows, schedule),
        "supervised_tokens": sum(
            sum(t != data.IGNORE_INDEX for t in rows[i]["features"]["labels"]) for idx in schedule for i in idx
        ),
    }


def _short(result: dict) -> dict:
    return {k: result[k] for k in ("mean_accuracy", "pooled_accuracy", "dev_accuracy", "seconds")}


# ----------------------------------------------------------------------------------------------------------------
# one training run, its records


def run_group(methods: Sequence[Method], seed: int, bench: Bench, log: Callable[[str], None] = print) -> list[dict]:
    """Train once for ``methods`` (which share a ``training_key``), evaluate each one's finish, append its record."""
    s = bench.settings
    lead = methods[0]
    if any(m.training_key != lead.training_key for m in methods):
        raise ValueError(f"methods {[m.name for m in methods]} do not share one training run")
    if s.device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(seed)
    start = time.perf_counter()
    model = build_base(lead, bench)
    if lead.adapter == "none":
        model.eval()
        setup_seconds = time.perf_counter() - start
        result = evaluate(model, bench)
        trainable, adapter_dtype = 0, None
        training = {
            "train_loss": [], "eval_curve": [{"step": 0, "train_seconds": 0.0, **_short(result)}], "final": result,
            "train_seconds": 0.0, "init_seconds": 0.0, "eval_seconds": round(result["seconds"], 3),
            "padded_tokens": 0, "supervised_tokens": 0,
        }  # fmt: skip
        peft_model = model
    else:
        from peft import get_peft_model

        config = adapter_config(lead, s)
        init_seconds = preprocess_lora_ga(model, config, bench, seed) if lead.adapter == "lora_ga" else 0.0
        peft_model = get_peft_model(model, config)
        compile_training(peft_model, lead, s)
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        adapter_dtype = str(next(p.dtype for p in peft_model.parameters() if p.requires_grad))
        setup_seconds = time.perf_counter() - start
        training = train(peft_model, lead, bench, seed, log, init_seconds)
    records = []
    for method in sorted(methods, key=lambda m: m.finish != "none"):  # merges consume the adapter: last
        directory = save_dir(bench.out, f"{method.name}-s{seed}") if s.save and trainable else None
        saved = [save_atomically(peft_model, directory / "adapter")] if directory is not None else []
        unmerged = None
        final = training["final"]
        scored = peft_model
        if method.finish != "none":
            unmerged = {k: final[k] for k in ("mean_accuracy", "pooled_accuracy", "dev_accuracy", "correct")}
            scored = finish(method, peft_model, bench, directory)
            final = evaluate(scored, bench)
            training["eval_seconds"] += round(final["seconds"], 3)
            if directory is not None and (directory / "merged-int4").exists():
                saved.append(str(directory / "merged-int4"))
        select = evaluate(scored, bench, bench.select) if bench.select else None  # the finished model picks the lr
        if select is not None:
            training["eval_seconds"] += round(select["seconds"], 3)
        record = {
            "method": method.name, "about": method.about, "seed": seed, "lr": s.lr, "steps": s.steps,
            "recipe": s.recipe, "base": method.base,
            "adapter": method.adapter, "balance": method.balance if method.adapter == "blora" else None,
            "use_lora_lr": method.use_lora_lr, "alpha_factor": method.alpha_factor,
            "tile": list(method.tile) if method.adapter == "qablora" else None, "finish": method.finish,
            "trainable_params": trainable, "adapter_dtype": adapter_dtype,
            "tasks": list(bench.dev), "dev_n": {t: len(r) for t, r in bench.dev.items()},
            "mean_accuracy": final["mean_accuracy"], "pooled_accuracy": final["pooled_accuracy"],
            "dev_accuracy": final["dev_accuracy"], "correct": final["correct"], "unmerged": unmerged,
            "select": None if select is None else {
                k: select[k] for k in ("mean_accuracy", "pooled_accuracy", "dev_accuracy", "correct")},
            "select_n": {t: len(r) for t, r in bench.select.items()},
            "majority_baseline": majority_baseline(bench.train_rows, bench.dev),
            **{k: v for k, v in training.items() if k != "final"},
            "setup_seconds": round(setup_seconds, 3),
            "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if s.device.startswith("cuda") else None,
            "saved": saved, "settings": {k: v for k, v in vars(s).items()}, **bench.meta.get("record", {}),
            "time": datetime.datetime.now().isoformat(timespec="seconds"),
        }  # fmt: skip
        append_record(bench.out, record)
        records.append(record)
    del peft_model, model, scored
    if s.compile != "off":
        torch._dynamo.reset()  # every run builds a new model: keep the compiled layer's guards to this one
    return records


def failure_record(method: Method, job, bench: Bench, error: str) -> dict:
    """The record of ``job`` (a ``parallel.Job``) when its run diverged: enough for the report to show it in the lr grid."""
    return {"method": method.name, "about": method.about, "seed": job.seed, "lr": job.lr, "steps": job.steps,
            "recipe": job.recipe, "base": method.base, "adapter": method.adapter, "finish": method.finish,
            "dev_n": {t: len(r) for t, r in bench.dev.items()}, "failed": error,
            "settings": dict(vars(bench.settings))}  # fmt: skip
