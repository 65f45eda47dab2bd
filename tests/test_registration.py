"""Importing peft_balanced registers its PEFT types with peft, once, whatever the number of imports."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from peft import PeftConfig, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType
from tiny import tiny_llama

from peft_balanced import BLoRAConfig, BLoRAModel
from peft_balanced.integration import OWNED_PEFT_TYPES


def test_owned_types_are_peft_type_members():
    for name in OWNED_PEFT_TYPES:
        assert PeftType(name).value == name
        assert name in list(PeftType.__members__)


def test_blora_is_registered_with_its_config_tuner_and_prefix():
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.BLORA] is BLoRAConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.BLORA] is BLoRAModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.BLORA] == "bal_"


def test_prefix_does_not_overlap_any_other_registered_prefix():
    ours = PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.BLORA]
    for peft_type, prefix in PEFT_TYPE_TO_PREFIX_MAPPING.items():
        if peft_type != PeftType.BLORA:
            assert ours not in prefix and prefix not in ours, (peft_type, prefix)


def test_importing_twice_and_reloading_is_harmless():
    """Runs in a fresh process: a reload replaces the classes, which would confuse the other tests' imports."""
    code = textwrap.dedent(
        f"""
        import importlib, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import peft_balanced
        import peft_balanced as again
        from peft import get_peft_model
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
        from peft.utils import PeftType
        from tiny import tiny_llama
        importlib.reload(peft_balanced)
        importlib.reload(peft_balanced)
        assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.BLORA] is peft_balanced.BLoRAConfig
        assert [m for m in PeftType.__members__ if m == "BLORA"] == ["BLORA"]
        model = get_peft_model(tiny_llama(), peft_balanced.BLoRAConfig(r=2, target_modules=["q_proj"]))
        assert model.peft_type == PeftType.BLORA
        print("OK")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.stdout.strip().endswith("OK"), result.stderr[-2000:]


def test_generic_peft_config_from_dict_builds_a_blora_config():
    config = BLoRAConfig(r=4, balance_factor=4, target_modules=["q_proj"])
    rebuilt = PeftConfig.from_peft_type(**config.to_dict())
    assert isinstance(rebuilt, BLoRAConfig) and rebuilt.balance_factor == 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"balance_factor": 0}, "balance_factor must be a positive integer"),
        ({"balance_factor": -2}, "balance_factor must be a positive integer"),
        ({"balance_factor": 2.0}, "balance_factor must be a positive integer"),
        ({"balance_factor": True}, "balance_factor must be a positive integer"),
        ({"r": 0}, "r must be a positive integer"),
        ({"r": 1.5}, "r must be a positive integer"),
        ({"lora_dropout": 1.0}, "lora_dropout must be in"),
        ({"bias": "lora_only"}, "bias must be 'none' or 'all'"),
        ({"lora_alpha": "16"}, "lora_alpha must be a number"),
    ],
)
def test_invalid_config_values_are_rejected_with_the_field_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BLoRAConfig(target_modules=["q_proj"], **kwargs)


def test_balance_factor_not_dividing_a_dimension_names_the_module():
    model = tiny_llama()  # hidden 64, intermediate 128: 3 divides neither
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj.*in_features \(64\).*balance_factor=3"):
        get_peft_model(model, BLoRAConfig(r=2, balance_factor=3, target_modules=["q_proj"]))


def test_skip_indivisible_leaves_such_modules_unadapted():
    model = tiny_llama(num_key_value_heads=1, hidden_size=64, num_attention_heads=4)  # k/v_proj: 64 -> 16
    config = BLoRAConfig(r=2, balance_factor=32, target_modules=["q_proj", "k_proj"], skip_indivisible=True)
    with pytest.warns(UserWarning, match="k_proj"):
        adapted = get_peft_model(model, config)
    attention = adapted.base_model.model.model.layers[0].self_attn
    assert hasattr(attention.q_proj, "bal_A") and not hasattr(attention.k_proj, "bal_A")


def test_target_modules_matching_nothing_are_reported():
    with pytest.raises(ValueError, match="not_a_module"):
        get_peft_model(tiny_llama(), BLoRAConfig(r=2, target_modules=["not_a_module"]))


def test_non_linear_target_is_rejected_with_its_name():
    with pytest.raises(TypeError, match="embed_tokens.*Embedding"):
        get_peft_model(tiny_llama(), BLoRAConfig(r=2, target_modules=["embed_tokens"]))


def test_startup_hook_knows_every_owned_type():
    from peft_balanced import _startup

    assert _startup.OWNED_PEFT_TYPES is OWNED_PEFT_TYPES


def test_skip_indivisible_that_skips_every_target_is_an_error_naming_them():
    config = BLoRAConfig(r=2, balance_factor=3, target_modules=["q_proj", "k_proj"], skip_indivisible=True)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"adapted no module.*q_proj \(64 -> 64\)"):
        get_peft_model(tiny_llama(), config)
