"""``peft-balanced probe``: which balance factor λ (or plain LoRA) suits a model, from a few batches of its data.

It takes the ``sft`` command's model and data flags (``--model_name_or_path``, also ``default`` or a ``.gguf``
file; ``--dataset_name``; ``--load_in_4bit``), runs :func:`peft_balanced.probe_balance` and prints its table and
recommendation. Rows with ``text``, ``messages`` (through the tokenizer's chat template) or ``prompt`` /
``completion`` are read; every token is a label.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import Any

from ..utils import LLAMA_PROJECTIONS
from . import CLIError

__all__ = ["add_parser", "row_text", "run_probe"]


def row_text(row: dict[str, Any], tokenizer) -> str:
    """The training text of one dataset row (``text``, ``messages`` or ``prompt`` + ``completion``)."""
    if "text" in row:
        return row["text"]
    if "messages" in row:
        return tokenizer.apply_chat_template(row["messages"], tokenize=False)
    if "prompt" in row and "completion" in row:
        return f"{row['prompt']}{row['completion']}"
    raise CLIError(f"a dataset row has columns {sorted(row)}; expected 'text', 'messages' or 'prompt' + 'completion'")


def _batches(rows, tokenizer, batch_size: int, num_batches: int, max_length: int) -> Iterator[dict]:
    texts = [row_text(row, tokenizer) for _, row in zip(range(batch_size * num_batches), rows, strict=False)]
    if not texts:
        raise CLIError("the dataset split is empty")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[start : start + batch_size],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_length,
        )
        yield {**enc, "labels": enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)}


def _factors(text: str) -> tuple[int, ...]:
    items = text.split(",")
    if not all(item.strip().isdigit() and int(item) > 0 for item in items):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers such as 1,2,4,8; got {text!r}")
    return tuple(int(item) for item in items)


def _load_rows(args):
    from datasets import load_dataset

    from .sft_checks import SFTArgumentError, local_data_files

    try:
        local = local_data_files(args.dataset_name)
    except SFTArgumentError as err:
        raise CLIError(str(err)) from None
    if local is not None:
        builder, files = local
        dataset = load_dataset(builder, data_files={"train": files})
    else:
        dataset = load_dataset(args.dataset_name)
    if args.dataset_train_split not in dataset:
        raise CLIError(f"--dataset_train_split {args.dataset_train_split!r} is not a split; it has {sorted(dataset)}")
    return dataset[args.dataset_train_split]


def run_probe(args: argparse.Namespace) -> None:
    """Load the model and data of ``args``, probe, print the table."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .. import probe_balance
    from .model_source import resolve_model

    try:
        path = resolve_model(args.model_name_or_path)
    except FileNotFoundError as err:
        raise CLIError(str(err)) from None
    dtype = getattr(torch, args.dtype)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if args.load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    rows = _load_rows(args)
    batches = _batches(rows, tokenizer, args.per_device_train_batch_size, args.num_batches, args.max_length)
    targets = args.lora_target_modules.split(",") if args.lora_target_modules else LLAMA_PROJECTIONS
    try:
        result = probe_balance(model, batches, factors=args.factors, target_modules=targets, seed=args.seed)
    except ValueError as err:
        raise CLIError(str(err)) from None
    print(result.table())


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``probe`` subcommand to ``subparsers`` (of the ``peft-balanced`` parser); return its parser."""
    probe = subparsers.add_parser(
        "probe",
        help="measure which balance factor (or plain LoRA) suits a model, from a few batches",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    probe.add_argument("--model_name_or_path", required=True, help="model directory, Hub id, 'default' or a .gguf")
    probe.add_argument("--dataset_name", required=True, help="local .json/.jsonl/.parquet/.csv (globs) or a dataset")
    probe.add_argument("--dataset_train_split", default="train", help="split to read")
    probe.add_argument("--load_in_4bit", action="store_true", help="bitsandbytes NF4 base (as sft --load_in_4bit)")
    probe.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="compute dtype")
    probe.add_argument("--lora_target_modules", default=None, help="comma list (default: the 7 Llama projections)")
    probe.add_argument("--factors", type=_factors, default=(1, 2, 4, 8), help="balance factors to measure")
    probe.add_argument("--num_batches", type=int, default=4, help="batches over which the gradient is summed")
    probe.add_argument("--per_device_train_batch_size", type=int, default=8, help="rows per batch")
    probe.add_argument("--max_length", type=int, default=256, help="tokens per row (truncated)")
    probe.add_argument("--seed", type=int, default=0, help="seed of the shuffled control")
    probe.set_defaults(func=run_probe)
    return probe
