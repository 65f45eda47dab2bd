"""Generated tasks, tokenization with a masked prompt, exact-match and BIG-bench choice scoring (tiny models)."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import tiny_llama, tiny_tokenizer

from peft_balanced.demo import data

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


@pytest.fixture
def tokenizer():
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.mark.parametrize("name", sorted(data.TASKS))
def test_task_is_deterministic_per_seed(name):
    a = data.make_task(name, 50, seed=3)
    assert a == data.make_task(name, 50, seed=3)
    assert a != data.make_task(name, 50, seed=4)
    assert len({ex["prompt"] for ex in a}) == 50
    assert all(set(ex) == {"system", "prompt", "answer"} for ex in a)


def test_task_answers_follow_the_rule():
    for ex in data.make_task("add", 30, seed=0):
        left, right = ex["prompt"].split(" + ")
        assert ex["answer"] == str(int(left) + int(right))
    for ex in data.make_task("reverse", 30, seed=0):
        assert ex["answer"].split() == ex["prompt"].split()[::-1]


@pytest.mark.parametrize("name", sorted(data.TASKS))
def test_splits_are_disjoint_and_deterministic(name):
    train, held_out = data.make_splits(name, 300, 100, seed=1)
    assert (len(train), len(held_out)) == (300, 100)
    assert not {ex["prompt"] for ex in train} & {ex["prompt"] for ex in held_out}
    assert (train, held_out) == data.make_splits(name, 300, 100, seed=1)


def test_unknown_task_is_rejected():
    with pytest.raises(ValueError, match="unknown task"):
        data.make_task("nope", 3)


def test_labels_mask_the_prompt(tokenizer):
    ex = data.make_task("add", 1, seed=0)[0]
    feats = data.tokenize_example(tokenizer, ex)
    prompt_ids = tokenizer(data.format_prompt(tokenizer, ex), add_special_tokens=False)["input_ids"]
    n = len(prompt_ids)
    assert feats["input_ids"][:n] == prompt_ids
    assert feats["labels"][:n] == [-100] * n
    completion = feats["input_ids"][n:]
    assert feats["labels"][n:] == completion
    # the supervised part is the answer and the end-of-turn token, nothing else
    assert completion == tokenizer(ex["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert feats["attention_mask"] == [1] * len(feats["input_ids"])


def test_prompt_without_chat_template_falls_back_to_text():
    tok = tiny_tokenizer()
    ex = {"system": "Do it.", "prompt": "1 + 2", "answer": "3"}
    assert data.format_prompt(tok, ex) == "Do it.\n1 + 2\nAnswer: "
    feats = data.tokenize_example(tok, ex)
    assert feats["input_ids"][-1] == tok.eos_token_id and feats["labels"][-2:] == feats["input_ids"][-2:]


def test_collate_pads_right_and_masks_padding(tokenizer):
    examples = [{"system": "", "prompt": "1", "answer": "2"}, {"system": "s", "prompt": "12 + 34", "answer": "46"}]
    batch = data.make_batch(tokenizer, examples)
    lengths = [len(data.tokenize_example(tokenizer, ex)["input_ids"]) for ex in examples]
    assert batch["input_ids"].shape == (2, max(lengths))
    short = min(range(2), key=lambda i: lengths[i])
    assert batch["attention_mask"][short].tolist() == [1] * lengths[short] + [0] * (max(lengths) - lengths[short])
    assert (batch["labels"][short, lengths[short] :] == -100).all()
    assert (batch["input_ids"][short, lengths[short] :] == tokenizer.pad_token_id).all()
    with pytest.raises(ValueError):
        data.collate([], 0)


def test_completion_loss_equals_the_full_loss(tokenizer):
    model = tiny_llama(vocab_size=len(tokenizer))
    examples = data.make_task("add", 3, seed=0) + data.make_task("reverse", 2, seed=0)
    right = data.make_batch(tokenizer, examples)
    left = data.make_batch(tokenizer, examples, padding_side="left")
    assert (left["attention_mask"][:, -1] == 1).all() and (left["labels"][:, -1] != -100).all()
    with torch.no_grad():
        expected = model(**right).loss
        got = data.completion_loss(model, left)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        data.collate([{"input_ids": [1]}], 0, padding_side="middle")


def test_exact_match_on_a_tiny_model(tokenizer):
    model = tiny_llama(vocab_size=len(tokenizer))
    examples = data.make_task("add", 7, seed=0)
    preds = data.generate_answers(model, tokenizer, examples, max_new_tokens=4, batch_size=3)
    assert len(preds) == 7
    # left padding: batching must not change greedy answers
    assert preds == data.generate_answers(model, tokenizer, examples, max_new_tokens=4, batch_size=1)
    assert tokenizer.padding_side == "right" and not model.training  # restored
    matching = [{**ex, "answer": f" {p} "} for ex, p in zip(examples, preds, strict=True)]
    assert data.exact_match_accuracy(model, tokenizer, matching, max_new_tokens=4) == 1.0
    half = [m if i % 2 else {**m, "answer": m["answer"] + "x"} for i, m in enumerate(matching)]
    acc, got = data.exact_match_accuracy(model, tokenizer, half, 4, 4, return_predictions=True)
    assert acc == pytest.approx(3 / 7) and got == preds


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _bb_row(i, append=False, choices=("True", "False"), answer=0):
    return {
        "task": "toy",
        "id": i,
        "task_prefix": "Decide.",
        "input_prefix": "\nQ: ",
        "input": f"question {i}",
        "output_prefix": "\nA: ",
        "choice_prefix": "\n  choice: ",
        "append_choices_to_input": append,
        "choices": list(choices),
        "answer": answer,
    }


def test_load_bigbench_schema(tmp_path):
    task = tmp_path / "toy"
    task.mkdir()
    _write_jsonl(task / "dev.jsonl", [_bb_row(0), _bb_row(1, append=True, choices=("a", "b", "c"), answer=2)])
    _write_jsonl(task / "train.jsonl", [_bb_row(i) for i in range(5)])
    rows = data.load_bigbench(task, "dev")
    assert [r["id"] for r in rows] == [0, 1]
    assert rows[0]["prompt"] == "Decide.\nQ: question 0\nA: "
    assert rows[1]["prompt"] == "Decide.\nQ: question 1\n  choice: a\n  choice: b\n  choice: c\nA: "
    assert rows[1]["answer"] == 2 and rows[1]["target"] == "c"
    assert len(data.load_bigbench(task, "train", limit=3)) == 3
    assert data.load_bigbench(task / "train.jsonl") == data.load_bigbench(task, "train")
    with pytest.raises(FileNotFoundError):
        data.load_bigbench(task, "test")
    _write_jsonl(task / "bad.jsonl", [_bb_row(0, answer=5)])
    with pytest.raises(ValueError, match="out of range"):
        data.load_bigbench(task, "bad")


def _naive_logprob(model, tokenizer, prompt: str, choice: str) -> float:
    context = prompt.rstrip(" ")
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    cont = tokenizer(prompt[len(context) :] + choice, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    return sum(logp[len(ctx) - 1 + k, t].item() for k, t in enumerate(cont))


@pytest.mark.parametrize("normalize", ["none", "tokens", "chars"])
def test_choice_accuracy_picks_the_most_likely_choice(tmp_path, normalize):
    tokenizer = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tokenizer))
    rows = [_bb_row(i, choices=("yes", "no", "maybe so"), answer=i % 3) for i in range(6)]
    _write_jsonl(tmp_path / "dev.jsonl", rows)
    examples = data.load_bigbench(tmp_path, "dev")
    acc, preds = data.choice_accuracy(
        model, tokenizer, examples, batch_size=4, normalize=normalize, return_predictions=True
    )
    expected = []
    for ex in examples:
        scores = []
        for choice in ex["choices"]:
            n = {"none": 1, "tokens": len(tokenizer(" " + choice)["input_ids"]), "chars": len(" " + choice)}[normalize]
            scores.append(_naive_logprob(model, tokenizer, ex["prompt"], choice) / n)
        expected.append(max(range(3), key=scores.__getitem__))
    assert preds == expected
    assert acc == pytest.approx(sum(p == ex["answer"] for p, ex in zip(preds, examples, strict=True)) / 6)
    assert data.choice_accuracy(model, tokenizer, examples, batch_size=1, normalize=normalize) == pytest.approx(acc)


def _text(tokenizer, ids) -> str:
    return "".join(tokenizer.convert_ids_to_tokens(ids))


def test_tokenize_choice_labels_only_the_continuation_with_the_prompt_space():
    tokenizer = tiny_tokenizer()
    features = data.tokenize_choice(tokenizer, "Q: sky? A: ", "blue")
    labelled = [t for t, label in zip(features["input_ids"], features["labels"], strict=True) if label != -100]
    assert _text(tokenizer, features["input_ids"]) == "Q: sky? A: blue"
    assert _text(tokenizer, labelled) == " blue"


def test_tokenize_choice_truncates_the_context_from_the_left():
    tokenizer = tiny_tokenizer()
    features = data.tokenize_choice(tokenizer, "0123456789 A: ", "yes", max_length=9)
    assert _text(tokenizer, features["input_ids"]) == "89 A: yes"
    assert features["labels"][-4:] == features["input_ids"][-4:]
    with pytest.raises(ValueError, match="max_length=3 leaves no context"):
        data.tokenize_choice(tokenizer, "Q A: ", "yes", max_length=3)
