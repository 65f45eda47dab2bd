"""Specification of the transformers integration of the tile INT4 format (quant method "tile_int4")."""

import json
import os
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.quantizers import auto as hf_auto

from peft_balanced.quant import TileInt4Config, TileInt4HfQuantizer, TileInt4Linear, quantize_model
from peft_balanced.quant.hf import register_tile_int4

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _tiny_llama(tie_word_embeddings: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        tie_word_embeddings=tie_word_embeddings,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def fp_dir(tmp_path_factory):
    """A full-precision tiny Llama checkpoint."""
    path = tmp_path_factory.mktemp("fp")
    _tiny_llama().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def quantized(fp_dir):
    """The fp checkpoint loaded with TileInt4Config (quantized on load)."""
    return AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=TileInt4Config(tile=(4, 8)))


@pytest.fixture(scope="module")
def q_dir(quantized, tmp_path_factory):
    """The quantized model saved with save_pretrained."""
    path = tmp_path_factory.mktemp("q")
    quantized.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))


def _quant_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": value
        for name, module in model.named_modules()
        if isinstance(module, TileInt4Linear)
        for key, value in module.state_dict().items()
    }


def _assert_same_quant_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


def test_importing_registers_tile_int4_with_transformers():
    assert hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING["tile_int4"] is TileInt4Config
    assert hf_auto.AUTO_QUANTIZER_MAPPING["tile_int4"] is TileInt4HfQuantizer


def test_registering_again_is_harmless():
    register_tile_int4()
    register_tile_int4()
    assert hf_auto.AUTO_QUANTIZER_MAPPING["tile_int4"] is TileInt4HfQuantizer


def test_config_round_trips_through_json():
    config = TileInt4Config(tile=(8, 8), skip_modules=["lm_head", "down_proj"], scale_dtype=torch.bfloat16)
    restored = hf_auto.AutoQuantizationConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert isinstance(restored, TileInt4Config)
    assert restored.to_dict() == config.to_dict()
    assert restored.tile == (8, 8) and restored.scale_dtype == "bfloat16" and restored.zero_dtype == "float32"


def test_config_saved_without_zero_dtype_means_zero_points_in_the_scale_dtype():
    old = {"quant_method": "tile_int4", "tile": [4, 8], "skip_modules": ["lm_head"], "scale_dtype": "float16"}
    assert hf_auto.AutoQuantizationConfig.from_dict(old).zero_dtype == "float16"
    assert TileInt4Config(scale_dtype="bfloat16", zero_dtype=None).zero_dtype == "bfloat16"


@pytest.mark.parametrize(("zero_dtype", "bits"), [("float32", 5.5), ("float16", 5.0)])
def test_quantizer_element_size_counts_scale_and_zero_bits(zero_dtype, bits):
    quantizer = TileInt4HfQuantizer(TileInt4Config(tile=(4, 8), zero_dtype=zero_dtype), pre_quantized=False)
    assert quantizer.quantized_element_size == bits / 8


def test_config_saved_by_a_newer_version_loads_with_a_warning_naming_the_unknown_fields():
    newer = {"quant_method": "tile_int4", "tile": [4, 8], "zero_dtype": "float32", "packing": "v2"}
    with pytest.warns(UserWarning, match=r"ignoring fields \['packing'\]"):
        config = hf_auto.AutoQuantizationConfig.from_dict(newer)
    assert config.tile == (4, 8) and not hasattr(config, "packing")


def test_config_rejects_bad_tile():
    with pytest.raises(ValueError, match="l2 .*positive int"):
        TileInt4Config(tile=(4, 0))


def test_quantizer_allows_training_and_saving():
    quantizer = TileInt4HfQuantizer(TileInt4Config(), pre_quantized=False)
    assert quantizer.is_trainable and quantizer.is_serializable()


def test_from_pretrained_with_config_quantizes_every_linear_but_lm_head(quantized):
    kinds = {name.rpartition(".")[2]: type(module) for name, module in quantized.named_modules()}
    assert all(kinds[name] is TileInt4Linear for name in LINEAR_NAMES)
    assert type(quantized.lm_head) is nn.Linear
    assert quantized.is_quantized and quantized.config.quantization_config.tile == (4, 8)
    assert not any(p.is_meta for p in quantized.parameters()) and not any(b.is_meta for b in quantized.buffers())
    assert all("weight" not in m._parameters for m in quantized.modules() if isinstance(m, TileInt4Linear))


def test_quantize_on_load_matches_quantize_model_in_memory(fp_dir, quantized, tokens):
    reference = quantize_model(AutoModelForCausalLM.from_pretrained(fp_dir))
    _assert_same_quant_state(_quant_state(quantized), _quant_state(reference))
    assert torch.equal(quantized(tokens).logits, reference(tokens).logits)


def test_quantize_on_load_reports_no_missing_or_unexpected_keys(fp_dir):
    _, info = AutoModelForCausalLM.from_pretrained(
        fp_dir, quantization_config=TileInt4Config(), output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_saved_checkpoint_holds_packed_codes_and_config(q_dir):
    from safetensors import safe_open

    config = json.loads((q_dir / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "tile_int4"
    with safe_open(str(q_dir / "model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
        qweight = handle.get_tensor("model.layers.0.self_attn.q_proj.qweight")
    assert "model.layers.0.self_attn.q_proj.scale" in keys and "model.layers.0.self_attn.q_proj.zero" in keys
    assert "model.layers.0.self_attn.q_proj.weight" not in keys
    assert qweight.dtype == torch.uint8 and qweight.shape == (64, 32)


def test_save_then_plain_from_pretrained_is_bit_exact_in_same_process(quantized, q_dir, tokens):
    reloaded, info = AutoModelForCausalLM.from_pretrained(q_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    _assert_same_quant_state(_quant_state(reloaded), _quant_state(quantized))
    assert torch.equal(reloaded(tokens).logits, quantized(tokens).logits)


def test_save_then_plain_from_pretrained_is_bit_exact_in_fresh_process_after_reloading_the_plugin(
    quantized, q_dir, tokens, tmp_path
):
    out = tmp_path / "reloaded.pt"
    script = textwrap.dedent(
        f"""
        import importlib
        import torch
        import peft_balanced
        importlib.reload(peft_balanced.quant.hf)
        importlib.reload(peft_balanced.quant)
        importlib.reload(peft_balanced)  # registering the reloaded classes again must not raise
        from transformers import AutoModelForCausalLM
        from peft_balanced.quant import TileInt4Linear
        model = AutoModelForCausalLM.from_pretrained({str(q_dir)!r})
        state = {{f"{{n}}.{{k}}": v for n, m in model.named_modules() if isinstance(m, TileInt4Linear)
                 for k, v in m.state_dict().items()}}
        tokens = torch.load({str(tmp_path / "tokens.pt")!r})
        torch.save({{"state": state, "logits": model(tokens).logits}}, {str(out)!r})
        """
    )
    torch.save(tokens, tmp_path / "tokens.pt")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120, capture_output=True)
    result = torch.load(out)
    _assert_same_quant_state(result["state"], _quant_state(quantized))
    assert torch.equal(result["logits"], quantized(tokens).logits)


def _startup_hook_installed() -> bool:
    return any((Path(p) / "peft_balanced_startup.pth").exists() for p in site.getsitepackages())


@pytest.mark.skipif(not _startup_hook_installed(), reason="needs the package installed (its .pth start-up hook)")
def test_plain_from_pretrained_without_importing_the_plugin_raises_an_error_naming_the_import(q_dir):
    script = f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained({str(q_dir)!r})"
    repo_root = str(Path(__file__).resolve().parents[1])  # this tree's start-up hook, not another install's
    env = {**os.environ, "PYTHONPATH": repo_root, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode != 0, "loaded without error: the 4-bit layers would hold random weights"
    assert "ValueError" in result.stderr, result.stderr[-2000:]
    assert "'tile_int4'" in result.stderr and "import peft_balanced" in result.stderr, result.stderr[-2000:]


@pytest.mark.skipif(not _startup_hook_installed(), reason="needs the package installed (its .pth start-up hook)")
def test_the_start_up_hook_lets_a_load_through_once_the_plugin_is_imported_after_transformers(q_dir):
    script = textwrap.dedent(
        f"""
        from transformers import AutoModelForCausalLM
        import peft_balanced
        model = AutoModelForCausalLM.from_pretrained({str(q_dir)!r})
        print(type(model.model.layers[0].self_attn.q_proj).__name__)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert result.stdout.strip().endswith("TileInt4Linear"), result.stderr[-2000:]


def test_quantize_model_output_saves_and_reloads_bit_exact(tmp_path, tokens):
    model = quantize_model(_tiny_llama(), tile=(8, 8), scale_dtype="bfloat16")
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.quantization_config.tile == (8, 8)
    assert reloaded.model.layers[0].mlp.up_proj.scale.dtype == torch.bfloat16
    assert reloaded.model.layers[0].mlp.up_proj.zero.dtype == torch.float32
    _assert_same_quant_state(_quant_state(reloaded), _quant_state(model))
    assert torch.equal(reloaded(tokens).logits, model(tokens).logits)


def test_checkpoint_saved_before_zero_dtype_existed_reloads_bit_exact(tmp_path, tokens):
    model = quantize_model(_tiny_llama(), tile=(4, 8), scale_dtype="float16", zero_dtype=None)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["quantization_config"]["zero_dtype"]  # as written before the field existed
    (tmp_path / "config.json").write_text(json.dumps(config))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.model.layers[0].mlp.up_proj.zero.dtype == torch.float16
    _assert_same_quant_state(_quant_state(reloaded), _quant_state(model))
    assert torch.equal(reloaded(tokens).logits, model(tokens).logits)


def test_skip_modules_are_kept_in_full_precision_on_load(fp_dir):
    model = AutoModelForCausalLM.from_pretrained(
        fp_dir, quantization_config=TileInt4Config(skip_modules=["lm_head", "down_proj"])
    )
    assert type(model.model.layers[1].mlp.down_proj) is nn.Linear
    assert isinstance(model.model.layers[1].mlp.up_proj, TileInt4Linear)


def test_load_error_names_module_with_indivisible_dims(fp_dir):
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.k_proj'.*D_out=32 is not divisible by l2=64"):
        AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=TileInt4Config(tile=(4, 64)))


def test_model_dequantize_returns_plain_linears_with_dequantized_weights(fp_dir, tokens):
    model = AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=TileInt4Config())
    expected = model(tokens).logits
    weight = model.model.layers[0].self_attn.q_proj.dequantize()
    model.dequantize()
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, weight)
    assert torch.equal(model(tokens).logits, expected)


def test_tied_lm_head_is_never_quantized(tmp_path):
    model = _tiny_llama(tie_word_embeddings=True)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=TileInt4Config(skip_modules=[]))
    assert type(loaded.lm_head) is nn.Linear and loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert type(quantize_model(model, skip_modules=()).lm_head) is nn.Linear


def test_skip_modules_entry_matching_no_linear_is_refused_on_load(fp_dir):
    with pytest.raises(ValueError, match=r"skip_modules entries \['down_projj'\] match no linear"):
        AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=TileInt4Config(skip_modules=["down_projj"]))


def test_checkpoint_whose_config_tile_disagrees_with_its_tensors_names_both_tiles(q_dir, tmp_path):
    import shutil

    edited = tmp_path / "edited"
    shutil.copytree(q_dir, edited)
    config = json.loads((edited / "config.json").read_text())
    config["quantization_config"]["tile"] = [8, 8]
    (edited / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"says tile=\(8, 8\).*'model.layers.0.self_attn.q_proj'.*is tile=\(4, 8\)"):
        AutoModelForCausalLM.from_pretrained(edited)


@pytest.mark.slow  # inductor compiles the decode step on CPU
def test_generate_with_a_static_cache_compiles_the_decode_step_and_gives_the_eager_tokens(q_dir):
    from transformers import CompileConfig

    model = AutoModelForCausalLM.from_pretrained(q_dir)
    assert model.hf_quantizer.is_compileable
    prompt = torch.tensor([[1, 5, 9, 2]])
    kwargs = dict(max_new_tokens=6, do_sample=False, cache_implementation="static", pad_token_id=0)
    eager = model.generate(prompt, disable_compile=True, **kwargs)
    torch._dynamo.reset()
    config = CompileConfig(fullgraph=True, mode="default", dynamic=False)
    config._compile_all_devices = True  # transformers compiles on accelerators only unless told
    compiled = model.generate(prompt, compile_config=config, **kwargs)
    assert torch.equal(compiled, eager)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
