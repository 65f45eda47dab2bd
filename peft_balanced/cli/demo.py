"""``peft-balanced demo``: load the default offline model (SmolLM2-135M-Instruct), quantize it to NF4, wrap it with
Q-BLoRA, fine-tune it on a generated task on CPU, save the adapter and a merged 16-bit model, and show the
exact-match accuracy before, after, and after merging.

The demo's model, data and merging helpers live in :mod:`peft_balanced.demo` (also used by the tutorials and the
benchmarks); this module is the command around them (:func:`add_parser` adds it to the ``peft-balanced`` parser).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import pathlib
import random
import sys
import time
import warnings
from collections.abc import Iterator, Sequence

from ..demo.merge import merge_to_dense
from ..utils import LLAMA_PROJECTIONS
from . import CLIError

__all__ = ["CLIError", "add_parser", "build_adapter_config", "run_demo"]

LLAMA_TARGETS = list(LLAMA_PROJECTIONS)
_DEMO_OUTPUTS = ("adapter", "merged", "summary.json")


# ----------------------------------------------------------------------------------------------------------------
# building blocks


def build_adapter_config(
    method: str = "blora",
    r: int = 8,
    lora_alpha: float = 16,
    balance_factor: int = 2,
    lora_dropout: float = 0.0,
    target_modules: Sequence[str] | str = tuple(LLAMA_TARGETS),
):
    """The PEFT config of the demo: ``peft_balanced.BLoRAConfig`` (``"blora"``) or ``peft.LoraConfig`` (``"lora"``)."""
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    common = {"r": r, "lora_alpha": lora_alpha, "lora_dropout": lora_dropout, "target_modules": targets}
    if method == "lora":
        from peft import LoraConfig

        return LoraConfig(task_type="CAUSAL_LM", **common)
    if method == "blora":
        import peft_balanced

        config_cls = getattr(peft_balanced, "BLoRAConfig", None)
        if config_cls is None:
            raise CLIError("peft_balanced.BLoRAConfig is not available in this installation; use --method lora")
        return config_cls(task_type="CAUSAL_LM", balance_factor=balance_factor, **common)
    raise CLIError(f"unknown method {method!r}")


def _check_output_dir(path: pathlib.Path, overwrite: bool) -> None:
    """Refuse a file, or a non-empty directory unless ``overwrite``."""
    if path.exists() and not path.is_dir():
        raise CLIError(f"--output-dir {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise CLIError(f"--output-dir {path} is not empty; pass --overwrite to replace the demo outputs in it")


def _prepare_output_dir(path: pathlib.Path, overwrite: bool) -> None:
    """Refuse a non-empty directory unless ``overwrite``; then only the demo's own outputs are removed."""
    import shutil

    _check_output_dir(path, overwrite)
    if path.is_dir():
        for name in _DEMO_OUTPUTS:
            target = path / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    path.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def _staged_outputs(out: pathlib.Path, overwrite: bool) -> Iterator[pathlib.Path]:
    """A fresh folder next to ``out`` to write the outputs into; on success they are moved into ``out``.

    Only then are the old demo outputs in ``out`` removed, and each new one appears whole (one rename). If the run
    fails before, ``out`` is left as it was and the staging folder is removed.
    """
    import os
    import secrets
    import shutil

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.staging-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        yield staging
        _prepare_output_dir(out, overwrite)
        for name in _DEMO_OUTPUTS:
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, 1.0 - (step - warmup) / max(1, total - warmup))


# ----------------------------------------------------------------------------------------------------------------
# demo


def run_demo(args: argparse.Namespace) -> dict:
    """Run the demo described by parsed ``args``; return the summary (also written to ``summary.json``)."""
    out = pathlib.Path(args.output_dir)
    _check_output_dir(out, args.overwrite)  # the old outputs stay until the new ones are complete

    import torch
    from tqdm.auto import tqdm

    from ..demo import data
    from ..demo.models import load_default_model

    t_start = time.perf_counter()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = data.TASKS[args.task]
    max_new = spec.max_new_tokens
    train_set, eval_set = data.make_splits(args.task, args.steps * args.batch_size, args.eval_size, args.seed)
    peft_config = build_adapter_config(
        args.method, args.r, args.lora_alpha, args.balance_factor, args.lora_dropout, LLAMA_TARGETS
    )

    print(
        f"[1/6] loading SmolLM2-135M-Instruct (GGUF) and quantizing to {args.quantization or 'none'} ...", flush=True
    )
    quant = None if args.quantization == "none" else args.quantization
    model, tokenizer = load_default_model(dtype=torch.float32, quantization=quant)
    load_seconds = model.load_seconds
    print(f"      loaded in {load_seconds:.1f} s", flush=True)

    def evaluate(m) -> tuple[float, list[str], float]:
        t0 = time.perf_counter()
        acc, preds = data.exact_match_accuracy(
            m, tokenizer, eval_set, max_new, args.eval_batch_size, return_predictions=True
        )
        return acc, preds, time.perf_counter() - t0

    print(f"[2/6] zero-shot exact match on {len(eval_set)} held-out '{args.task}' examples ...", flush=True)
    acc_before, preds_before, t_eval = evaluate(model)
    print(
        f"      accuracy before: {acc_before:.1%}  ({t_eval:.1f} s; e.g. {eval_set[0]['prompt']!r} -> "
        f"{preds_before[0]!r})",
        flush=True,
    )

    from peft import get_peft_model

    from .._compat import quiet_peft_checkpointing_alias

    with quiet_peft_checkpointing_alias():
        peft_model = get_peft_model(model, peft_config)
    trainable, total = peft_model.get_nb_trainable_parameters()
    print(
        f"[3/6] {type(peft_config).__name__}: {trainable:,} trainable / {total:,} parameters; training "
        f"{args.steps} steps x {args.batch_size} examples",
        flush=True,
    )
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warmup = max(1, min(args.warmup_steps, args.steps))
    peft_model.train()
    t_train = time.perf_counter()
    losses: list[float] = []
    bar = tqdm(range(args.steps), desc="train", dynamic_ncols=True, disable=args.no_progress)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = args.lr * _lr_factor(step, args.steps, warmup)
        chunk = train_set[step * args.batch_size : (step + 1) * args.batch_size]
        # left padding right-aligns the answers: the vocabulary projection runs only over the last few positions
        loss = data.completion_loss(peft_model, data.make_batch(tokenizer, chunk, padding_side="left"))
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"non-finite loss at step {step}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % args.log_every == 0 or step == args.steps - 1:
            tqdm.write(f"      step {step + 1:>4}/{args.steps}  loss {loss.item():.4f}")
    t_train = time.perf_counter() - t_train
    peft_model.eval()

    print("[4/6] exact match with the trained adapter ...", flush=True)
    acc_after, preds_after, _ = evaluate(peft_model)
    print(f"      accuracy after: {acc_after:.1%}  (e.g. {eval_set[0]['prompt']!r} -> {preds_after[0]!r})", flush=True)

    print("[5/6] saving the adapter, merging into a 16-bit model, saving it ...", flush=True)
    with _staged_outputs(out, args.overwrite) as staging:
        adapter_dir, merged_dir = out / "adapter", out / "merged"
        with warnings.catch_warnings():  # the GGUF folder has no config.json; the vocabulary is unchanged anyway
            warnings.filterwarnings("ignore", message="Could not find a config file")
            peft_model.save_pretrained(staging / "adapter")
        merged_dtype = getattr(torch, args.merged_dtype)
        merged = merge_to_dense(peft_model, dtype=merged_dtype)
        merged.save_pretrained(staging / "merged")
        tokenizer.save_pretrained(staging / "merged")
        del merged, peft_model, model

        print("[6/6] reloading the merged model from disk and re-checking its accuracy ...", flush=True)
        from transformers import AutoModelForCausalLM

        reloaded = AutoModelForCausalLM.from_pretrained(staging / "merged", dtype=merged_dtype)
        acc_merged, preds_merged, _ = evaluate(reloaded)
        agree = sum(a == b for a, b in zip(preds_after, preds_merged, strict=True)) / len(eval_set)

        summary = {
            "task": args.task,
            "method": args.method,
            "quantization": args.quantization,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "eval_examples": len(eval_set),
            "trainable_params": trainable,
            "accuracy_before": acc_before,
            "accuracy_after": acc_after,
            "accuracy_merged": acc_merged,
            "merged_agreement": agree,
            "final_loss": losses[-1],
            "load_seconds": round(load_seconds, 1),
            "train_seconds": round(t_train, 1),
            "total_seconds": round(time.perf_counter() - t_start, 1),
            "adapter_dir": str(adapter_dir),
            "merged_dir": str(merged_dir),
        }
        (staging / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _print_summary(summary)
    return summary


def _print_summary(summary: dict) -> None:
    rows = [
        ("task / method", f"{summary['task']} / {summary['method']} on {summary['quantization']} base"),
        ("trainable parameters", f"{summary['trainable_params']:,}"),
        ("training", f"{summary['steps']} steps x {summary['batch_size']}, final loss {summary['final_loss']:.4f}"),
        ("exact match before", f"{summary['accuracy_before']:.1%}"),
        ("exact match after (adapter)", f"{summary['accuracy_after']:.1%}"),
        ("exact match merged 16-bit", f"{summary['accuracy_merged']:.1%}"),
        ("merged == adapter answers", f"{summary['merged_agreement']:.1%}"),
        (
            "load / train / total time",
            f"{summary['load_seconds']} s / {summary['train_seconds']} s / {summary['total_seconds']} s",
        ),
        ("adapter", summary["adapter_dir"]),
        ("merged model", summary["merged_dir"]),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n" + "-" * (width + 40))
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print("-" * (width + 40))
    if summary["accuracy_merged"] != summary["accuracy_after"]:
        print(
            "note: the merged model is stored in 16 bits; rounding its weights can flip a few near-tied greedy "
            "tokens, so its accuracy may differ slightly from the adapter model's (see 'merged == adapter answers').",
            file=sys.stderr,
        )


# ----------------------------------------------------------------------------------------------------------------
# argument parsing


def _integer(text: str, minimum: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    return _integer(text, 1, "a positive integer")


def _non_negative_int(text: str) -> int:
    return _integer(text, 0, "an integer >= 0")


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None


def _positive_float(text: str) -> float:
    value = _number(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def _dropout(text: str) -> float:
    value = _number(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be a probability in [0, 1), got {text!r}")
    return value


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``demo`` subcommand to ``subparsers`` (of the ``peft-balanced`` parser); return its parser."""
    from ..demo.data import TASKS

    demo = subparsers.add_parser(
        "demo",
        help="fine-tune the offline SmolLM2-135M with Q-BLoRA on CPU, then merge",
        description="Fine-tune SmolLM2-135M-Instruct (NF4) with Q-BLoRA on a generated task; save and merge.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    demo.add_argument("--output-dir", default="demo-output", help="where the adapter and merged model go")
    demo.add_argument("--overwrite", action="store_true", help="replace the demo outputs in a non-empty output dir")
    demo.add_argument("--task", choices=sorted(TASKS), default="add", help="generated task")
    demo.add_argument("--steps", type=_positive_int, default=40, help="training steps")
    demo.add_argument("--batch-size", type=_positive_int, default=16, help="examples per step")
    demo.add_argument("--lr", type=_positive_float, default=1e-3, help="peak AdamW learning rate")
    demo.add_argument("--warmup-steps", type=_non_negative_int, default=4, help="linear warm-up steps")
    demo.add_argument("--seed", type=_non_negative_int, default=0, help="seed of data and initialization")
    demo.add_argument("--eval-size", type=_positive_int, default=128, help="held-out examples")
    demo.add_argument("--eval-batch-size", type=_positive_int, default=64, help="generation batch size")
    demo.add_argument("--method", choices=["blora", "lora"], default="blora", help="adapter type")
    demo.add_argument("--r", type=_positive_int, default=8, help="base rank")
    demo.add_argument("--balance-factor", type=_positive_int, default=2, help="BLoRA balance factor λ")
    demo.add_argument("--lora-alpha", type=_positive_float, default=16.0, help="scaling numerator (s = alpha / r)")
    demo.add_argument("--lora-dropout", type=_dropout, default=0.0, help="adapter input dropout")
    demo.add_argument("--quantization", choices=["nf4", "none"], default="nf4", help="base model quantization")
    demo.add_argument("--merged-dtype", choices=["bfloat16", "float16"], default="bfloat16", help="merged dtype")
    demo.add_argument("--threads", type=_non_negative_int, default=0, help="torch CPU threads (0: torch default)")
    demo.add_argument("--log-every", type=_positive_int, default=10, help="print the loss every N steps")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    demo.set_defaults(func=run_demo)
    return demo
