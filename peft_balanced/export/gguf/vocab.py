"""Tokenizer metadata for GGUF export: a byte-level BPE fast tokenizer as llama.cpp's "gpt2" vocabulary.

transformers rebuilds a tokenizer from a GGUF (``integrations/gguf/gguf_tokenizer_mapping.py``) out of
``tokenizer.ggml.{model, pre, tokens, token_type, merges, *_token_id, add_bos_token, add_eos_token}`` and
``tokenizer.chat_template``; llama.cpp reads the same keys. For ``model = "gpt2"`` the tokens are spelled in the
byte-level alphabet (``Ġ`` for a space), exactly as a byte-level BPE ``tokenizer.json`` stores them; tokens marked
CONTROL (3) become special tokens, USER_DEFINED (4) plain added tokens. Sentencepiece / WordPiece / Unigram
vocabularies are not written (a clear error says so; pass ``tokenizer=None`` to export the model alone).
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["infer_pre_tokenizer", "write_tokenizer"]

NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5  # gguf.TokenType values

_GPT2_REGEX_BYTE_LEVEL = {"type": "ByteLevel", "use_regex": True}
_LLAMA3_SPLIT = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)


def _is(step: dict | None, expected: dict) -> bool:
    return step is not None and all(step.get(k) == v for k, v in expected.items())


def infer_pre_tokenizer(pre: dict | None) -> str | None:
    """llama.cpp's pre-tokenizer name for a ``tokenizer.json`` ``pre_tokenizer``, or ``None`` if not recognized.

    * ``ByteLevel(use_regex=True)``: GPT-2's split -> ``"gpt2"`` (what transformers builds from SmolLM2's GGUF).
    * ``Sequence[Digits(individual_digits=True), ByteLevel(use_regex=True)]`` -> ``"smollm"`` (SmolLM's own).
    * ``Sequence[Split(Llama-3 regex), ByteLevel(use_regex=False)]`` -> ``"llama-bpe"``.
    """
    if _is(pre, _GPT2_REGEX_BYTE_LEVEL) and not pre.get("add_prefix_space", False):
        return "gpt2"
    steps = pre.get("pretokenizers") if _is(pre, {"type": "Sequence"}) else None
    if not steps or len(steps) != 2:
        return None
    first, second = steps
    if _is(first, {"type": "Digits", "individual_digits": True}) and _is(second, _GPT2_REGEX_BYTE_LEVEL):
        return "smollm"
    pattern = (first.get("pattern") or {}).get("Regex") if _is(first, {"type": "Split"}) else None
    if pattern == _LLAMA3_SPLIT and _is(second, {"type": "ByteLevel", "use_regex": False}):
        return "llama-bpe"
    return None


def _tokenizer_state(tokenizer: Any) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(
            f"cannot write tokenizer {type(tokenizer).__name__} to GGUF: it needs a fast (tokenizers-backed) "
            "tokenizer; pass tokenizer=None to export the model alone"
        )
    return json.loads(backend.to_str())


def _check_byte_level_bpe(state: dict) -> None:
    model = state.get("model") or {}
    byte_level = '"ByteLevel"' in json.dumps(state.get("pre_tokenizer")) and _is(
        state.get("decoder"), {"type": "ByteLevel"}
    )
    if model.get("type") != "BPE" or not byte_level or state.get("normalizer") is not None:
        raise ValueError(
            f"cannot write this tokenizer to GGUF: only byte-level BPE tokenizers (GPT-2 style, e.g. SmolLM2 or "
            f"Llama 3: model BPE, ByteLevel pre-tokenizer and decoder, no normalizer) are supported; got model "
            f"{model.get('type')!r}, pre_tokenizer {(state.get('pre_tokenizer') or {}).get('type')!r}, normalizer "
            f"{(state.get('normalizer') or {}).get('type')!r}. Pass tokenizer=None to export the model alone "
            "(transformers loads it; load the tokenizer from its own files)."
        )
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") or model.get("dropout"):
        raise ValueError("cannot write a BPE tokenizer with a subword prefix/suffix or dropout to GGUF")


def _merges(model: dict) -> list[str]:
    merges = []
    for merge in model.get("merges") or []:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        if " " in left or " " in right:
            raise ValueError(f"cannot write merge {merge!r}: GGUF stores merges as 'left right' strings")
        merges.append(f"{left} {right}")
    return merges


def _tokens(state: dict, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens in id order and their llama.cpp types, padded with UNUSED ``[PAD<id>]`` up to ``vocab_size``."""
    vocab = dict(state["model"]["vocab"])
    added = {entry["id"]: entry for entry in state.get("added_tokens") or []}
    vocab.update({entry["content"]: token_id for token_id, entry in added.items()})
    by_id = {token_id: token for token, token_id in vocab.items()}
    if len(by_id) != len(vocab):
        raise ValueError("cannot write the tokenizer: two tokens share an id")
    size = max(by_id) + 1
    if size > vocab_size:
        raise ValueError(
            f"cannot write the tokenizer: it has ids up to {size - 1} but the model's vocab_size is {vocab_size}; "
            "resize the embeddings (model.resize_token_embeddings(len(tokenizer))) first"
        )
    tokens, types = [], []
    for token_id in range(vocab_size):
        if token_id not in by_id:
            tokens.append(f"[PAD{token_id}]")
            types.append(UNUSED)
        elif token_id in added:
            tokens.append(by_id[token_id])
            types.append(CONTROL if added[token_id].get("special") else USER_DEFINED)
        else:
            tokens.append(by_id[token_id])
            types.append(NORMAL)
    return tokens, types


def _adds_special(tokenizer: Any, token_id: int | None, position: int) -> bool:
    """Whether encoding with special tokens puts ``token_id`` at ``position`` (0: BOS, -1: EOS)."""
    if token_id is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[position] == token_id


def write_tokenizer(writer: Any, tokenizer: Any, vocab_size: int, pre_tokenizer: str | None = None) -> None:
    """Add ``tokenizer.ggml.*`` (and ``tokenizer.chat_template``) for a byte-level BPE tokenizer to ``writer``.

    Args:
        writer: a ``gguf.GGUFWriter`` before its header is written.
        tokenizer: a transformers fast tokenizer.
        vocab_size: the model's vocabulary size (rows of the embedding); the token list is padded to it.
        pre_tokenizer: llama.cpp's pre-tokenizer name; inferred by :func:`infer_pre_tokenizer` when ``None``.
    """
    state = _tokenizer_state(tokenizer)
    _check_byte_level_bpe(state)
    if pre_tokenizer is None:
        pre_tokenizer = infer_pre_tokenizer(state.get("pre_tokenizer"))
        if pre_tokenizer is None:
            raise ValueError(
                "cannot infer llama.cpp's pre-tokenizer name (tokenizer.ggml.pre) for pre_tokenizer "
                f"{json.dumps(state.get('pre_tokenizer'))[:200]}; pass export_gguf(..., pre_tokenizer=NAME) with the "
                "name llama.cpp uses for this model (e.g. 'gpt2', 'smollm', 'llama-bpe', 'qwen2')"
            )
    tokens, types = _tokens(state, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = _merges(state["model"])
    if merges:
        writer.add_token_merges(merges)
    special_ids = [
        (writer.add_bos_token_id, tokenizer.bos_token_id),
        (writer.add_eos_token_id, tokenizer.eos_token_id),
        (writer.add_unk_token_id, tokenizer.unk_token_id),
        (writer.add_pad_token_id, tokenizer.pad_token_id),
    ]
    for add, token_id in special_ids:
        if token_id is not None:
            add(int(token_id))
    writer.add_add_bos_token(_adds_special(tokenizer, tokenizer.bos_token_id, 0))
    writer.add_add_eos_token(_adds_special(tokenizer, tokenizer.eos_token_id, -1))
    writer.add_add_space_prefix(False)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)
