"""Checkpoints written by an earlier version (tests/checkpoints/<version>, made by tests/checkpoints/make.py with that
version's code) load unchanged: same tensors, same outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import peft_balanced  # noqa: F401  (registers the types)
from peft_balanced import TileInt4Linear

VERSIONS = sorted(p for p in (Path(__file__).parent / "checkpoints").iterdir() if p.is_dir())
ADAPTER_BASES = {"blora": "base", "qablora": "tile_int4", "gradapprox": "base"}


def _base(version: Path, name: str):
    kwargs = {"dtype": torch.float32} if name == "base" else {}
    return AutoModelForCausalLM.from_pretrained(version / name, **kwargs).eval()


def _expected(version: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(version / "expected.safetensors"))


def _logits(model, tokens) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits.float()


def test_there_is_a_checkpoint_of_the_first_version():
    assert [v.name for v in VERSIONS][:1] == ["v0.1.0"]


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: v.name)
def test_a_saved_tile_int4_model_reloads_with_its_outputs(version):
    model = _base(version, "tile_int4")
    expected = _expected(version)
    assert any(isinstance(m, TileInt4Linear) for m in model.modules())
    torch.testing.assert_close(_logits(model, expected["tokens"]), expected["tile_int4"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("adapter", sorted(ADAPTER_BASES))
@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: v.name)
def test_a_saved_adapter_reloads_with_its_tensors_and_outputs(version, adapter):
    model = PeftModel.from_pretrained(_base(version, ADAPTER_BASES[adapter]), str(version / adapter)).eval()
    saved = safetensors.torch.load_file(str(version / adapter / "adapter_model.safetensors"))
    loaded = {k.replace(".default", ""): v for k, v in model.state_dict().items()}
    for key, tensor in saved.items():
        assert torch.equal(loaded[key], tensor), key
    expected = _expected(version)
    torch.testing.assert_close(_logits(model, expected["tokens"]), expected[adapter], rtol=1e-5, atol=1e-6)
