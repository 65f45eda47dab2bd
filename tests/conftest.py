"""Shared fixtures: tiny transformers models built from configs (nothing is downloaded)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from tiny import LLAMA_TARGETS, tiny_llama, tiny_llama_config  # noqa: E402, F401

import peft_balanced  # noqa: E402, F401  (registers the PEFT types)


@pytest.fixture
def model():
    return tiny_llama()


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def saved_tiny_llama(tmp_path_factory) -> str:
    """Directory of a saved tiny Llama (for from_pretrained with quantization configs)."""
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama(initializer_range=0.1).save_pretrained(path)
    return str(path)
