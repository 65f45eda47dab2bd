"""Quantization backends are resolved at one point (ours first, then peft's); kernels follow one named setting."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
from peft.utils.quantization_utils import Bnb8bitBackend
from torch import nn

import peft_balanced
import peft_balanced.quant.kernels.support as support
from peft_balanced import KernelPreference
from peft_balanced.backends import FastBnb4bitBackend, TileInt4Backend, is_linear_base, resolve_backend
from peft_balanced.quant import TileInt4Linear
from peft_balanced.settings import fast_nf4_allowed


def test_tile_int4_layers_get_our_backend():
    layer = TileInt4Linear.from_linear(nn.Linear(64, 64), (4, 8))
    assert isinstance(resolve_backend(layer), TileInt4Backend) and is_linear_base(layer)


def test_bitsandbytes_4bit_layers_get_the_fast_nf4_backend_and_8bit_layers_peft_s():
    assert isinstance(resolve_backend(bnb.nn.Linear4bit(64, 64, quant_type="nf4")), FastBnb4bitBackend)
    assert isinstance(resolve_backend(bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False)), Bnb8bitBackend)


def test_plain_linear_has_no_backend_and_other_modules_are_no_linear_base():
    assert resolve_backend(nn.Linear(8, 8)) is None and is_linear_base(nn.Linear(8, 8))
    assert not is_linear_base(nn.Embedding(8, 8))


@pytest.fixture
def no_preference(monkeypatch):
    monkeypatch.delenv("PEFT_BALANCED_DISABLE_TRITON", raising=False)
    monkeypatch.delenv("PEFT_BALANCED_DISABLE_FAST_NF4", raising=False)
    peft_balanced.set_kernel_preference(None)
    yield
    peft_balanced.set_kernel_preference(None)


def test_default_preference_is_auto(no_preference):
    assert peft_balanced.get_kernel_preference() is KernelPreference.AUTO and fast_nf4_allowed()


def test_old_environment_flags_are_aliases_of_the_preference(no_preference, monkeypatch):
    monkeypatch.setenv("PEFT_BALANCED_DISABLE_FAST_NF4", "1")
    assert peft_balanced.get_kernel_preference() is KernelPreference.BITSANDBYTES and not fast_nf4_allowed()
    monkeypatch.setenv("PEFT_BALANCED_DISABLE_TRITON", "1")
    assert peft_balanced.get_kernel_preference() is KernelPreference.TORCH


def test_a_set_preference_wins_over_the_environment(no_preference, monkeypatch):
    monkeypatch.setenv("PEFT_BALANCED_DISABLE_TRITON", "1")
    peft_balanced.set_kernel_preference("auto")
    assert peft_balanced.get_kernel_preference() is KernelPreference.AUTO


def test_context_manager_sets_the_preference_inside_and_restores_it_after(no_preference, monkeypatch):
    monkeypatch.setattr(support.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(support, "_triton_importable", lambda: True)
    assert support.triton_available()
    with peft_balanced.kernel_preference(KernelPreference.TORCH) as preference:
        assert preference is KernelPreference.TORCH and not support.triton_available()
    assert support.triton_available()


def test_an_unknown_preference_names_the_valid_ones(no_preference):
    with pytest.raises(ValueError, match=r"'auto', 'bitsandbytes', 'torch'.*got 'fast'"):
        peft_balanced.set_kernel_preference("fast")
