"""Data made by the package (small generated tasks scored by exact match) and a BIG-bench jsonl loader.

Generated tasks are deterministic per seed and short (about 35-45 tokens with the chat template), so that a
small model can be fine-tuned on them on CPU in minutes:

- ``add``: add two 2-digit numbers (``"47 + 38"`` -> ``"85"``).
- ``reverse``: reverse the order of four words (``"apple river stone cloud"`` -> ``"cloud stone river apple"``).

SmolLM2-135M-Instruct scores 0 % exact match on both zero-shot (it answers in sentences); 40 LoRA steps of
16 examples bring it to about 80 % (``add``) and 97 % (``reverse``).

BIG-bench tasks are read from a folder given explicitly, or found by :func:`default_bigbench_root`:
``$PEFT_BALANCED_BIGBENCH``, then the folders of :data:`BIGBENCH_LOOKUP` relative to the working directory.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "TASKS",
    "TaskSpec",
    "bigbench_prompt",
    "choice_accuracy",
    "collate",
    "completion_loss",
    "BIGBENCH_ENV",
    "BIGBENCH_LOOKUP",
    "default_bigbench_root",
    "exact_match_accuracy",
    "format_prompt",
    "generate_answers",
    "load_bigbench",
    "make_batch",
    "make_splits",
    "make_task",
    "tokenize_choice",
    "tokenize_example",
]

IGNORE_INDEX = -100

_WORDS = (
    "apple river stone cloud tiger paper glass horse candle mirror garden rocket silver forest piano window dragon "
    "pencil ocean summer winter castle button island lemon violin rabbit bottle jacket planet"
).split()


@dataclass(frozen=True)
class TaskSpec:
    """A generated task: an instruction (system message) and a generator of ``(prompt, answer)`` pairs."""

    name: str
    instruction: str
    generate: Callable[[random.Random], tuple[str, str]]
    max_new_tokens: int


def _gen_add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"{a} + {b}", str(a + b)


def _gen_reverse(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(_WORDS, 4)
    return " ".join(words), " ".join(reversed(words))


TASKS: dict[str, TaskSpec] = {
    "add": TaskSpec("add", "Add the two numbers. Reply with the sum only.", _gen_add, 6),
    "reverse": TaskSpec(
        "reverse", "Reverse the order of the words. Reply with the reversed list only.", _gen_reverse, 12
    ),
}


def _task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}") from None


def make_task(
    name: str, n: int, seed: int = 0, exclude: Sequence[dict] | None = None, split: str = "train"
) -> list[dict]:
    """``n`` distinct examples ``{"system", "prompt", "answer"}`` of task ``name``, deterministic per ``seed``.

    ``split`` names an independent random stream; prompts found in ``exclude`` (examples) are skipped.
    """
    spec = _task(name)
    if n < 0:
        raise ValueError("n must be >= 0")
    seen = {ex["prompt"] for ex in exclude or ()}
    rng = random.Random(f"{name}:{split}:{seed}")  # str seeds are stable across runs
    out: list[dict] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise ValueError(f"task {name!r} cannot produce {n} distinct examples")
        prompt, answer = spec.generate(rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        out.append({"system": spec.instruction, "prompt": prompt, "answer": answer})
    return out


def make_splits(name: str, n_train: int, n_eval: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """A training set and a held-out set with no prompt in common."""
    train = make_task(name, n_train, seed)
    held_out = make_task(name, n_eval, seed, exclude=train, split="heldout")
    return train, held_out


# ----------------------------------------------------------------------------------------------------------------
# formatting and tokenization


def _messages(example: dict) -> list[dict]:
    messages = []
    if example.get("system"):
        messages.append({"role": "system", "content": example["system"]})
    messages.append({"role": "user", "content": example["prompt"]})
    return messages


def format_prompt(tokenizer, example: dict) -> str:
    """The generation prompt of an example: the chat template when the tokenizer has one, else plain text."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(_messages(example), tokenize=False, add_generation_prompt=True)
    system = f"{example['system']}\n" if example.get("system") else ""
    return f"{system}{example['prompt']}\nAnswer: "


def _format_completion(tokenizer, example: dict, prompt: str) -> str:
    """What follows the prompt in a full conversation: the answer and the end-of-turn marker."""
    if getattr(tokenizer, "chat_template", None):
        messages = [*_messages(example), {"role": "assistant", "content": example["answer"]}]
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if full.startswith(prompt):
            return full[len(prompt) :]
    return example["answer"] + (tokenizer.eos_token or "")


def tokenize_example(tokenizer, example: dict, max_length: int | None = None) -> dict[str, list[int]]:
    """``input_ids`` / ``attention_mask`` / ``labels`` of one example; prompt tokens are labelled -100."""
    prompt = format_prompt(tokenizer, example)
    completion = _format_completion(tokenizer, example, prompt)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    input_ids = prompt_ids + completion_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    if max_length is not None:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def collate(
    features: Sequence[dict[str, list[int]]], pad_token_id: int, padding_side: str = "right"
) -> dict[str, torch.Tensor]:
    """Pad tokenized examples into tensors (``padding_side`` "right" or "left"); padding: attention 0, label -100."""
    if not features:
        raise ValueError("cannot collate an empty batch")
    if padding_side not in ("right", "left"):
        raise ValueError("padding_side must be 'right' or 'left'")
    length = max(len(f["input_ids"]) for f in features)
    batch = {
        "input_ids": torch.full((len(features), length), pad_token_id, dtype=torch.long),
        "attention_mask": torch.zeros((len(features), length), dtype=torch.long),
        "labels": torch.full((len(features), length), IGNORE_INDEX, dtype=torch.long),
    }
    for row, f in enumerate(features):
        n = len(f["input_ids"])
        cols = slice(0, n) if padding_side == "right" else slice(length - n, length)
        batch["input_ids"][row, cols] = torch.tensor(f["input_ids"])
        batch["attention_mask"][row, cols] = torch.tensor(f.get("attention_mask", [1] * n))
        batch["labels"][row, cols] = torch.tensor(f.get("labels", f["input_ids"]))
    return batch


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad token nor an eos token")
    return pad


def make_batch(
    tokenizer, examples: Sequence[dict], max_length: int | None = None, padding_side: str = "right"
) -> dict[str, torch.Tensor]:
    """Tokenize and collate examples into a training batch (prompt masked in ``labels``)."""
    features = [tokenize_example(tokenizer, ex, max_length) for ex in examples]
    return collate(features, _pad_id(tokenizer), padding_side)


def completion_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Causal-LM loss of a batch, computing ``lm_head`` logits only over the trailing supervised window.

    Equals ``model(**batch).loss`` (mean cross-entropy over labelled tokens). With a left-padded batch the
    answers are right-aligned, so only the last few positions need the (large) vocabulary projection, which
    makes a training step on short answers markedly cheaper. Position ids follow the attention mask.
    """
    labels, mask = batch["labels"], batch["attention_mask"]
    supervised = (labels != IGNORE_INDEX).any(0).nonzero()
    if supervised.numel() == 0:
        raise ValueError("the batch has no supervised tokens")
    first = max(int(supervised[0]), 1)  # the label at column 0 cannot be predicted
    keep = labels.shape[1] - first + 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(
        input_ids=batch["input_ids"], attention_mask=mask, position_ids=position_ids, logits_to_keep=keep
    ).logits
    targets = labels[:, first:]
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX
    )


# ----------------------------------------------------------------------------------------------------------------
# exact-match evaluation


def _model_device(model) -> torch.device:
    try:
        return next(p.device for p in model.parameters() if p.device.type != "meta")
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def generate_answers(
    model, tokenizer, examples: Sequence[dict], max_new_tokens: int = 8, batch_size: int = 32
) -> list[str]:
    """Greedy answers (left-padded batches, special tokens dropped, whitespace stripped) for ``examples``."""
    was_training = model.training
    model.eval()
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = _model_device(model)
    pad = _pad_id(tokenizer)
    answers: list[str] = []
    try:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            prompts = [format_prompt(tokenizer, ex) for ex in chunk]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, num_beams=1)
            new_tokens = out[:, enc["input_ids"].shape[1] :]
            answers.extend(t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return answers


def exact_match_accuracy(
    model,
    tokenizer,
    examples: Sequence[dict],
    max_new_tokens: int = 8,
    batch_size: int = 32,
    return_predictions: bool = False,
) -> float | tuple[float, list[str]]:
    """Share of examples whose greedy answer equals ``example["answer"]`` (after stripping whitespace)."""
    if not examples:
        raise ValueError("no examples to evaluate")
    preds = generate_answers(model, tokenizer, examples, max_new_tokens, batch_size)
    acc = sum(p == ex["answer"].strip() for p, ex in zip(preds, examples, strict=True)) / len(examples)
    return (acc, preds) if return_predictions else acc


# ----------------------------------------------------------------------------------------------------------------
# BIG-bench multiple choice


BIGBENCH_ENV = "PEFT_BALANCED_BIGBENCH"
# Where default_bigbench_root looks, in order, after $PEFT_BALANCED_BIGBENCH: relative to the working directory only
# (benchmarks and tutorials run from a checkout whose parent holds shared/data/bigbench); nothing is derived from
# where the package is installed.
BIGBENCH_LOOKUP = ("../shared/data/bigbench", "shared/data/bigbench")


def default_bigbench_root() -> pathlib.Path | None:
    """The BIG-bench folder: ``$PEFT_BALANCED_BIGBENCH`` if set, else the first folder of :data:`BIGBENCH_LOOKUP`
    (relative to the working directory) that exists; ``None`` if there is none."""
    env = os.environ.get(BIGBENCH_ENV)
    if env and pathlib.Path(env).is_dir():
        return pathlib.Path(env)
    for relative in BIGBENCH_LOOKUP:
        path = (pathlib.Path.cwd() / relative).resolve()
        if path.is_dir():
            return path
    return None


def bigbench_prompt(row: dict) -> str:
    """task_prefix + input_prefix + input [+ choice_prefix + choice for each choice] + output_prefix."""
    parts = [row.get("task_prefix", ""), row.get("input_prefix", ""), row["input"]]
    if row.get("append_choices_to_input"):
        parts += [row.get("choice_prefix", "") + choice for choice in row["choices"]]
    parts.append(row.get("output_prefix", ""))
    return "".join(parts)


def load_bigbench(task_dir: str | os.PathLike, split: str = "dev", limit: int | None = None) -> list[dict]:
    """Read ``<task_dir>/<split>.jsonl`` (or a ``.jsonl`` file) into ``{"prompt", "choices", "answer", ...}``.

    ``answer`` is the index of the correct choice; ``target`` is its text; the original fields are kept.
    """
    path = pathlib.Path(task_dir)
    if path.is_dir():
        path = path / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no BIG-bench file at {path}")
    rows = []
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            missing = {"input", "choices", "answer"} - row.keys()
            if missing:
                raise ValueError(f"{path}:{line_no}: missing fields {sorted(missing)}")
            answer = int(row["answer"])
            if not 0 <= answer < len(row["choices"]):
                raise ValueError(f"{path}:{line_no}: answer index {answer} out of range")
            rows.append({**row, "prompt": bigbench_prompt(row), "answer": answer, "target": row["choices"][answer]})
            if limit is not None and len(rows) >= limit:
                break
    return rows


def _split_context(prompt: str, choice: str) -> tuple[str, str]:
    """Move the prompt's trailing spaces into the continuation so that BPE merges them with the choice."""
    context = prompt.rstrip(" ")
    return context, prompt[len(context) :] + choice


def tokenize_choice(tokenizer, prompt: str, choice: str, max_length: int | None = None) -> dict[str, list[int]]:
    """Tokens of ``prompt`` followed by ``choice``, as :func:`choice_accuracy` scores them; the prompt is labelled -100.

    The prompt's trailing spaces move into the continuation (so that BPE merges them with the choice), a BOS token
    is prepended when the tokenizer adds one, and an empty context becomes one BOS (or pad) token. Training on
    ``tokenize_choice(tok, ex["prompt"], ex["target"])`` therefore teaches exactly the tokens that are scored.
    ``max_length`` drops context tokens from the left (the continuation is always kept whole).
    Returns ``input_ids``, ``attention_mask`` and ``labels``.
    """
    context, continuation = _split_context(prompt, choice)
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
        ctx = [tokenizer.bos_token_id, *ctx]
    if not ctx:
        ctx = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else _pad_id(tokenizer)]
    if max_length is not None and len(ctx) + len(cont) > max_length:
        if len(cont) >= max_length:
            raise ValueError(f"the continuation has {len(cont)} tokens; max_length={max_length} leaves no context")
        ctx = ctx[len(ctx) + len(cont) - max_length :]
    ids = ctx + cont
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [IGNORE_INDEX] * len(ctx) + cont}


@torch.no_grad()
def _choice_scores(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int, normalize: str) -> list[float]:
    """Summed log-probability of each ``(prompt, choice)`` continuation, divided as ``normalize`` says.

    Pairs are batched in order of length (little padding), left-padded so that every continuation ends at the last
    column; the vocabulary projection runs only over the trailing window that holds continuations, and each batch
    synchronizes with the device once.
    """
    device = _model_device(model)
    pad = _pad_id(tokenizer)
    feats = [tokenize_choice(tokenizer, prompt, choice) for prompt, choice in pairs]
    chars = [len(_split_context(prompt, choice)[1]) for prompt, choice in pairs]
    order = sorted(range(len(feats)), key=lambda i: -len(feats[i]["input_ids"]))
    scores = [0.0] * len(feats)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate([feats[i] for i in rows], pad, "left").items()}
        labels, mask = batch["labels"], batch["attention_mask"]
        window = max(int((labels != IGNORE_INDEX).sum(1).max()), 1)  # longest continuation in the batch
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            logits_to_keep=window + 1,
        ).logits[:, -window - 1 : -1]
        targets = labels[:, -window:]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        picked = logprobs.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        sums = torch.where(targets != IGNORE_INDEX, picked, 0.0).sum(1).tolist()
        for i, total in zip(rows, sums, strict=True):
            n_cont = sum(label != IGNORE_INDEX for label in feats[i]["labels"])
            denom = {"tokens": max(n_cont, 1), "chars": max(chars[i], 1), "none": 1}[normalize]
            scores[i] = total / denom
    return scores


def choice_accuracy(
    model,
    tokenizer,
    examples: Sequence[dict],
    batch_size: int = 16,
    normalize: str = "tokens",
    return_predictions: bool = False,
) -> float | tuple[float, list[int]]:
    """Multiple-choice accuracy: pick the choice with the highest length-normalized log-likelihood.

    ``examples`` come from :func:`load_bigbench` (keys ``prompt``, ``choices``, ``answer``). ``normalize`` is
    ``"tokens"`` (mean log-probability per token), ``"chars"`` (per character) or ``"none"`` (sum).
    """
    if normalize not in ("tokens", "chars", "none"):
        raise ValueError("normalize must be 'tokens', 'chars' or 'none'")
    if not examples:
        raise ValueError("no examples to evaluate")
    was_training = model.training
    model.eval()
    pairs = [_split_context(ex["prompt"], choice) for ex in examples for choice in ex["choices"]]
    try:
        scores = _choice_scores(model, tokenizer, pairs, batch_size, normalize)
    finally:
        model.train(was_training)
    preds, pos = [], 0
    for ex in examples:
        k = len(ex["choices"])
        chunk = scores[pos : pos + k]
        preds.append(max(range(k), key=lambda i: (chunk[i], -i)) if all(map(math.isfinite, chunk)) else -1)
        pos += k
    acc = sum(p == ex["answer"] for p, ex in zip(preds, examples, strict=True)) / len(examples)
    return (acc, preds) if return_predictions else acc
