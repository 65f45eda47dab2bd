"""transformers' own adapter API with our adapters, and the peft range the package declares (see the README).

``model.load_adapter`` (covered for every type by ``test_transformers_load_adapter_attaches_*``) works with the
installed versions; the rest of that API (``add_adapter``, ``set_adapter``, ``save_pretrained`` of an adapted model,
...) checks for peft >= ``transformers.integrations.peft.MIN_PEFT_VERSION``.
"""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version
from peft import get_peft_model
from tiny import LLAMA_TARGETS, tiny_llama
from transformers.integrations import peft as hf_peft

from peft_balanced import BLoRAConfig

ROOT = Path(__file__).resolve().parent.parent


def declared_peft() -> Requirement:
    return Requirement(re.search(r'^\s*"(peft[<>=!~ ].*?)",', (ROOT / "pyproject.toml").read_text(), re.M).group(1))


def test_installed_peft_is_within_the_declared_tested_range():
    assert declared_peft().specifier.contains(version("peft")), (version("peft"), str(declared_peft()))


@pytest.fixture
def loaded(tmp_path):
    config = BLoRAConfig(r=4, balance_factor=2, target_modules=LLAMA_TARGETS, init_weights=False)
    get_peft_model(tiny_llama(), config).save_pretrained(tmp_path / "adapter")
    model = tiny_llama()
    model.load_adapter(str(tmp_path / "adapter"), adapter_name="first")
    return model, tmp_path


def test_load_adapter_attaches_a_second_adapter_that_changes_nothing_until_selected(loaded, input_ids):
    model, tmp_path = loaded
    with torch.no_grad():
        before = model(input_ids).logits
        model.load_adapter(str(tmp_path / "adapter"), adapter_name="second")
        assert torch.equal(model(input_ids).logits, before)


@pytest.mark.skipif(
    Version(version("peft")) >= Version(hf_peft.MIN_PEFT_VERSION), reason="this peft has the full transformers API"
)
@pytest.mark.parametrize("call", ["set_adapter", "disable_adapters", "save_pretrained"])
def test_the_rest_of_transformers_adapter_api_demands_a_newer_peft(loaded, call):
    model, tmp_path = loaded
    arguments = {"set_adapter": ("first",), "disable_adapters": (), "save_pretrained": (str(tmp_path / "out"),)}
    with pytest.raises(ValueError, match=f">= {hf_peft.MIN_PEFT_VERSION}"):
        getattr(model, call)(*arguments[call])
