"""TileInt4Spec: one object describes a tile-INT4 quantization for the module, quantize_model and transformers."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_llama
from torch import nn

from peft_balanced.quant import TileInt4Config, TileInt4Linear, TileInt4Spec, quantize_model


def test_spec_normalises_names_and_an_unset_zero_dtype_means_the_scale_dtype():
    spec = TileInt4Spec([4, 8], "bf16", None, skip_modules="lm_head")
    assert spec == TileInt4Spec((4, 8), torch.bfloat16, torch.bfloat16, ("lm_head",))
    assert spec.bits_per_weight() == 4 + 32 / 32


def test_spec_rejects_a_bad_tile_and_a_bad_dtype_by_name():
    with pytest.raises(ValueError, match=r"tile l2 \(output features\) must be a positive int"):
        TileInt4Spec((4, 0))
    with pytest.raises(ValueError, match=r"zero_dtype must be float16, bfloat16 or float32.*int8"):
        TileInt4Spec((4, 8), zero_dtype="int8")


def test_spec_is_frozen():
    with pytest.raises(AttributeError):
        TileInt4Spec().tile = (8, 8)


def test_quantize_model_with_a_spec_equals_the_loose_arguments():
    spec = TileInt4Spec((8, 8), "float16", "float32", skip_modules=("lm_head", "down_proj"))
    by_spec = quantize_model(tiny_llama(), spec)
    loose = quantize_model(tiny_llama(), tile=(8, 8), skip_modules=["lm_head", "down_proj"], zero_dtype="float32")
    assert by_spec.state_dict().keys() == loose.state_dict().keys()
    assert all(torch.equal(value, loose.state_dict()[key]) for key, value in by_spec.state_dict().items())
    assert by_spec.config.quantization_config.to_dict() == TileInt4Config.from_spec(spec).to_dict()
    assert by_spec.config.quantization_config.spec == spec


def test_a_spec_and_a_conflicting_loose_argument_is_an_error_not_a_silent_choice():
    spec = TileInt4Spec((4, 8), "bfloat16")
    with pytest.raises(TypeError, match="either a TileInt4Spec or scale_dtype"):
        quantize_model(tiny_llama(), spec, scale_dtype="float32")
    with pytest.raises(TypeError, match="either a TileInt4Spec or zero_dtype"):
        TileInt4Linear.from_linear(nn.Linear(64, 64), spec, zero_dtype="float16")


def test_module_reports_its_format_as_a_spec():
    spec = TileInt4Spec((4, 8), "float16", "float32", skip_modules=())
    layer = TileInt4Linear.from_linear(nn.Linear(64, 64), spec)
    assert layer.spec == spec and layer.bits_per_weight() == spec.bits_per_weight() == 5.5
