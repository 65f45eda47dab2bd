"""The demo command (``peft_balanced.cli.demo``) on a tiny model: a stand-in for ``load_default_model``."""

from __future__ import annotations

import torch
from tiny import tiny_llama, tiny_tokenizer

from peft_balanced.demo import models

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


def tiny_chat_tokenizer():
    """The character tokenizer of ``tiny.py`` with a chat template."""
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def use_tiny_demo_model(monkeypatch) -> None:
    """Make the demo load a tiny Llama (NF4-quantized when it asks for ``"nf4"``) instead of SmolLM2."""
    tokenizer = tiny_chat_tokenizer()

    def tiny_loader(dtype=torch.float32, quantization=None, **kwargs):
        model = tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=128)
        if quantization == "nf4":
            models.quantize_linear_nf4(model)
        model.load_seconds = 0.0
        return model, tokenizer

    monkeypatch.setattr(models, "load_default_model", tiny_loader)
