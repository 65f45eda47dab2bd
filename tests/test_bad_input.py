"""Bad input, one table: every case raises a specific error type whose message names the module / parameter / value /
file at fault AND what would be valid. Nothing nonsensical is accepted silently."""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny import tiny_llama

from peft_balanced import (
    BLoRAConfig,
    GradApproxConfig,
    QABLoRAConfig,
    TileInt4Config,
    cli,
    export_gguf,
    init_gradapprox,
    quantize_model,
)
from peft_balanced.demo import models
from peft_balanced.quant.tile_int4 import quantize_tiles

NAN, INF = float("nan"), float("inf")


def _peft(config, quantize_tile=None):
    base = tiny_llama()
    if quantize_tile is not None:
        quantize_model(base, tile=quantize_tile)
    return get_peft_model(base, config)


def _forward_q_proj(config, width, quantize_tile=None):
    layer = _peft(config, quantize_tile).base_model.model.model.layers[0].self_attn.q_proj
    return layer(torch.randn(2, 3, width))


def _init_gradapprox(batches, **kwargs):
    model = _peft(GradApproxConfig(r=2, target_modules=["q_proj"]))
    init_gradapprox(model, batches, progress=False, **kwargs)


# (id, call, error type, fragments the message must contain: what is wrong and what is valid)
CASES: list[tuple[str, Callable[[], object], type[Exception], list[str]]] = [
    # --- BLoRA config
    ("blora-fractional-lambda", lambda: BLoRAConfig(balance_factor=2.5), ValueError,
     ["BLoRAConfig.balance_factor", "2.5", "positive integer"]),
    ("blora-bool-lambda", lambda: BLoRAConfig(balance_factor=True), ValueError,
     ["BLoRAConfig.balance_factor", "True", "positive integer"]),
    ("blora-zero-lambda", lambda: BLoRAConfig(balance_factor=0), ValueError,
     ["BLoRAConfig.balance_factor", "0", "positive integer"]),
    ("blora-string-lambda", lambda: BLoRAConfig(balance_factor="2"), ValueError,
     ["BLoRAConfig.balance_factor", "'2'", "positive integer"]),
    ("blora-zero-rank", lambda: BLoRAConfig(r=0), ValueError, ["BLoRAConfig.r", "0", "positive integer"]),
    ("blora-nan-alpha", lambda: BLoRAConfig(lora_alpha=NAN), ValueError, ["BLoRAConfig.lora_alpha", "nan", "finite"]),
    ("blora-inf-alpha", lambda: BLoRAConfig(lora_alpha=INF), ValueError, ["BLoRAConfig.lora_alpha", "inf", "finite"]),
    ("blora-negative-alpha", lambda: BLoRAConfig(lora_alpha=-1), ValueError,
     ["BLoRAConfig.lora_alpha", "-1", "> 0"]),
    ("blora-dropout-above-1", lambda: BLoRAConfig(lora_dropout=1.5), ValueError,
     ["BLoRAConfig.lora_dropout", "1.5", "[0, 1)"]),
    ("blora-negative-dropout", lambda: BLoRAConfig(lora_dropout=-0.1), ValueError,
     ["BLoRAConfig.lora_dropout", "-0.1", "[0, 1)"]),
    ("blora-unknown-bias", lambda: BLoRAConfig(bias="lora_only"), ValueError,
     ["BLoRAConfig.bias", "lora_only", "'none' or 'all'"]),
    ("blora-init-string", lambda: BLoRAConfig(init_weights="gaussian"), ValueError,
     ["BLoRAConfig.init_weights", "gaussian", "True or False"]),
    ("blora-flag-string", lambda: BLoRAConfig(skip_indivisible="yes"), ValueError,
     ["BLoRAConfig.skip_indivisible", "yes", "True or False"]),
    ("blora-lora-lr-string", lambda: BLoRAConfig(use_lora_lr="yes"), ValueError,
     ["BLoRAConfig.use_lora_lr", "yes", "True or False"]),
    ("blora-target-int", lambda: BLoRAConfig(target_modules=3), ValueError,
     ["BLoRAConfig.target_modules", "3", "list of module names"]),
    ("blora-negative-layer", lambda: BLoRAConfig(target_modules=["q_proj"], layers_to_transform=[-1]), ValueError,
     ["BLoRAConfig.layers_to_transform", "-1", ">= 0"]),
    ("blora-lambda-not-dividing", lambda: _peft(BLoRAConfig(balance_factor=3, target_modules=["q_proj"])), ValueError,
     ["q_proj", "in_features (64)", "balance_factor=3", "skip_indivisible=True"]),
    ("blora-embedding-target", lambda: _peft(BLoRAConfig(target_modules=["embed_tokens"])), TypeError,
     ["embed_tokens", "Embedding", "torch.nn.Linear"]),
    # --- QA-BLoRA
    ("qablora-zero-tile", lambda: QABLoRAConfig(tile=(0, 8)), ValueError, ["QABLoRAConfig.tile", "0", "positive int"]),
    ("qablora-negative-tile", lambda: QABLoRAConfig(tile=(4, -8)), ValueError,
     ["QABLoRAConfig.tile", "-8", "positive int"]),
    ("qablora-scalar-tile", lambda: QABLoRAConfig(tile=4), ValueError, ["QABLoRAConfig.tile", "4", "pair (l1, l2)"]),
    ("qablora-float-tile", lambda: QABLoRAConfig(tile=(4.0, 8)), ValueError,
     ["QABLoRAConfig.tile", "4.0", "positive int"]),
    ("qablora-nan-alpha", lambda: QABLoRAConfig(lora_alpha=NAN), ValueError,
     ["QABLoRAConfig.lora_alpha", "nan", "finite"]),
    ("qablora-tile-mismatch", lambda: _peft(QABLoRAConfig(tile=(8, 8), target_modules=["q_proj"]), (4, 8)),
     ValueError, ["q_proj", "tile=(4, 8)", "QABLoRAConfig(tile=(4, 8))"]),
    ("qablora-on-plain-linear", lambda: _peft(QABLoRAConfig(tile=(4, 8), target_modules=["q_proj"])), TypeError,
     ["q_proj", "Linear", "TileInt4Linear"]),
    # --- GradApprox
    ("gradapprox-unknown-init", lambda: GradApproxConfig(init="svd"), ValueError,
     ["GradApproxConfig.init", "svd", "'gradient', 'lora'"]),
    ("gradapprox-unknown-direction", lambda: GradApproxConfig(direction="AB"), ValueError,
     ["GradApproxConfig.direction", "AB", "ArB2r"]),
    ("gradapprox-unknown-scale", lambda: GradApproxConfig(init_scale="big"), ValueError,
     ["GradApproxConfig.init_scale", "big", "stable"]),
    ("gradapprox-depth-6", lambda: GradApproxConfig(approximator_depth=6), ValueError,
     ["GradApproxConfig.approximator_depth", "6", "0..5"]),
    ("gradapprox-nan-gamma", lambda: GradApproxConfig(stable_gamma=NAN), ValueError,
     ["GradApproxConfig.stable_gamma", "nan", "finite"]),
    ("gradapprox-inf-lr", lambda: GradApproxConfig(approximator_lr=INF), ValueError,
     ["GradApproxConfig.approximator_lr", "inf", "finite"]),
    ("gradapprox-string-seed", lambda: GradApproxConfig(sketch_seed="a"), ValueError,
     ["GradApproxConfig.sketch_seed", "'a'", "integer >= 0"]),
    ("gradapprox-zero-batches", lambda: GradApproxConfig(estimation_batches=0), ValueError,
     ["GradApproxConfig.estimation_batches", "0", "positive integer"]),
    ("gradapprox-rank-too-large", lambda: _peft(GradApproxConfig(r=40, target_modules=["k_proj"])), ValueError,
     ["k_proj", "r=40", "out_features=32", "r <= 16"]),
    ("gradapprox-init-no-labels", lambda: _init_gradapprox([{"input_ids": torch.zeros(1, 4, dtype=torch.long)}]),
     ValueError, ["batch 0", "no 'labels'", "DataCollatorForLanguageModeling"]),
    ("gradapprox-init-zero-batches", lambda: _init_gradapprox([], num_batches=0), ValueError,
     ["num_batches", "0", "positive integer"]),
    # --- INT4 tile format
    ("int4-tile-not-dividing", lambda: quantize_tiles(torch.randn(16, 16), tile=(3, 8)), ValueError,
     ["D_in=16", "l1=3", "not divisible"]),
    ("int4-negative-tile", lambda: quantize_tiles(torch.randn(16, 16), tile=(-4, 8)), ValueError,
     ["tile l1", "-4", "positive int"]),
    ("int4-1d-weight", lambda: quantize_tiles(torch.randn(16)), ValueError, ["(16,)", "2-D weight (D_out, D_in)"]),
    ("int4-integer-weight", lambda: quantize_tiles(torch.ones(16, 16, dtype=torch.int32)), TypeError,
     ["torch.int32", "floating-point"]),
    ("int4-nan-weight", lambda: quantize_tiles(torch.full((16, 16), NAN), name="w"), ValueError,
     ["'w'", "NaN or inf"]),
    ("int4-scale-dtype", lambda: quantize_tiles(torch.randn(16, 16), scale_dtype="int8"), ValueError,
     ["scale_dtype", "int8", "float16, bfloat16 or float32"]),
    ("int4-model-tile-not-dividing", lambda: quantize_model(tiny_llama(), tile=(3, 8)), ValueError,
     ["q_proj", "l1=3", "skip_modules", "skip_indivisible=True"]),
    ("int4-model-skip-int", lambda: quantize_model(tiny_llama(), skip_modules=5), ValueError,
     ["skip_modules", "5", "list of module names"]),
    ("int4-config-zero-tile", lambda: TileInt4Config(tile=(0, 8)), ValueError, ["tile l1", "0", "positive int"]),
    ("int4-config-zero-dtype", lambda: TileInt4Config(zero_dtype="float64"), ValueError,
     ["zero_dtype", "float64", "float16, bfloat16 or float32"]),
    ("int4-config-flag-string", lambda: TileInt4Config(skip_indivisible="no"), ValueError,
     ["TileInt4Config.skip_indivisible", "no", "True or False"]),
    ("int4-model-skip-typo", lambda: quantize_model(tiny_llama(), skip_modules=["lm_head", "down_projj"]), ValueError,
     ["skip_modules", "'down_projj'", "match no linear", "'down_proj'"]),
    ("int4-model-no-linear", lambda: quantize_model(torch.nn.Sequential(torch.nn.Embedding(4, 8), torch.nn.ReLU())),
     ValueError, ["no linear of Sequential", "torch.nn.Linear"]),
    ("int4-model-already-quantized", lambda: quantize_model(quantize_model(tiny_llama()), tile=(8, 8)), ValueError,
     ["already tile-INT4", "tile=(4, 8)", "asked for tile=(8, 8)", "16-bit model"]),
    # --- unknown keywords: TypeError, as a dataclass gives
    ("int4-config-unknown-field", lambda: TileInt4Config(tiles=(8, 8)), TypeError, ["'tiles'"]),
    ("int4-config-other-method", lambda: TileInt4Config(quant_method="bitsandbytes"), ValueError,
     ["TileInt4Config.quant_method", "'tile_int4'", "'bitsandbytes'"]),
    ("blora-config-unknown-field", lambda: BLoRAConfig(balance_factr=2), TypeError, ["'balance_factr'"]),
    ("qablora-config-unknown-field", lambda: QABLoRAConfig(tiles=(4, 8)), TypeError, ["'tiles'"]),
    ("gradapprox-config-unknown-field", lambda: GradApproxConfig(inits="lora"), TypeError, ["'inits'"]),
    # --- forward of an input whose width is not the adapted layer's in_features
    ("blora-forward-wrong-width", lambda: _forward_q_proj(BLoRAConfig(target_modules=["q_proj"]), width=48),
     ValueError, ["BLoRA module 'model.layers.0.self_attn.q_proj'", "in_features=64", "(2, 3, 48)"]),
    ("qablora-forward-wrong-width",
     lambda: _forward_q_proj(QABLoRAConfig(tile=(4, 8), target_modules=["q_proj"]), width=32, quantize_tile=(4, 8)),
     ValueError, ["QA-BLoRA module 'model.layers.0.self_attn.q_proj'", "in_features=64", "(2, 3, 32)"]),
]  # fmt: skip


@pytest.mark.parametrize(("call", "error", "fragments"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_argument_raises_a_named_error(call, error, fragments):
    with pytest.raises(error) as info:
        call()
    assert type(info.value) is error, f"{type(info.value).__name__}: {info.value}"
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} missing from: {info.value}"


# --- checkpoints: every error names the file


@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("adapter") / "good"
    _peft(BLoRAConfig(r=4, balance_factor=2, target_modules=["q_proj"], init_weights=False)).save_pretrained(path)
    return path


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


class _WritesMarker:
    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _truncate(path: Path) -> str:
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    return str(weights)


def _corrupt_header(path: Path) -> str:
    weights = path / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:24] = b"\xff" * 16
    weights.write_bytes(bytes(data))
    return str(weights)


def _other_lambda(path: Path) -> str:
    _edit_config(path, balance_factor=4)
    return str(path / "adapter_model.safetensors")


def _invalid_json(path: Path) -> str:
    (path / "adapter_config.json").write_text('{"peft_type": "BLORA", "r": 4,')
    return str(path / "adapter_config.json")


def _unknown_type(path: Path) -> str:
    _edit_config(path, peft_type="WOBBLE")
    return str(path / "adapter_config.json")


def _fractional_lambda_in_file(path: Path) -> str:
    _edit_config(path, balance_factor=2.5)
    return str(path / "adapter_config.json")


def _no_weights(path: Path) -> str:
    (path / "adapter_model.safetensors").unlink()
    return str(path)


def _pickle_only(path: Path) -> str:
    (path / "adapter_model.safetensors").unlink()
    _WritesMarker.marker = str(path / "MARKER")
    with open(path / "adapter_model.bin", "wb") as handle:
        pickle.dump({"x": _WritesMarker()}, handle)
    return str(path / "adapter_model.bin")


CHECKPOINT_CASES = [
    ("truncated-weights", _truncate, ValueError, ["truncated or corrupt", "save the adapter again"]),
    ("corrupt-header", _corrupt_header, ValueError, ["truncated or corrupt", "save the adapter again"]),
    ("config-lambda-differs-from-weights", _other_lambda, ValueError,
     ["balance_factor=4", "must be 16", "in module 'model.layers.0.self_attn.q_proj'", "has shape (8, 32)",
      "restore its adapter_config.json"]),
    ("invalid-json-config", _invalid_json, ValueError, ["not valid JSON", "save the adapter again"]),
    ("unknown-peft-type", _unknown_type, ValueError, ["unknown peft_type 'WOBBLE'", "BLORA", "LORA"]),
    ("fractional-lambda-in-file", _fractional_lambda_in_file, ValueError,
     ["balance_factor", "2.5", "positive integer"]),
    ("no-weights-file", _no_weights, FileNotFoundError, ["expected adapter_model.safetensors"]),
    ("pickled-weights-only", _pickle_only, ValueError, ["pickle", "adapter_model.safetensors only"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("damage", "error", "fragments"), [c[1:] for c in CHECKPOINT_CASES], ids=[c[0] for c in CHECKPOINT_CASES]
)
def test_broken_checkpoint_raises_an_error_naming_the_file(good_adapter, tmp_path, damage, error, fragments):
    import shutil

    path = tmp_path / "adapter"
    shutil.copytree(good_adapter, path)
    named_file = damage(path)
    with pytest.raises(error) as info:
        PeftModel.from_pretrained(tiny_llama(), str(path))
    message = str(info.value)
    assert type(info.value) is error, f"{type(info.value).__name__}: {message}"
    assert named_file in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} missing from: {message}"
    assert not (path / "MARKER").exists()


# --- the command line: argparse errors name the option, the value and what is valid (exit status 2)


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(models, "load_default_model", refuse)


CLI_CASES = [
    ("cli-fractional-lambda", ["--balance-factor", "2.5"], ["--balance-factor", "'2.5'", "positive integer"]),
    ("cli-zero-rank", ["--r", "0"], ["--r", "'0'", "positive integer"]),
    ("cli-nan-alpha", ["--lora-alpha", "nan"], ["--lora-alpha", "'nan'", "finite number > 0"]),
    ("cli-dropout-above-1", ["--lora-dropout", "1.5"], ["--lora-dropout", "'1.5'", "[0, 1)"]),
    ("cli-dropout-not-a-number", ["--lora-dropout", "half"], ["--lora-dropout", "'half'", "a number"]),
    ("cli-negative-warmup", ["--warmup-steps", "-1"], ["--warmup-steps", "'-1'", "integer >= 0"]),
    ("cli-negative-threads", ["--threads", "-2"], ["--threads", "'-2'", "integer >= 0"]),
    ("cli-unknown-task", ["--task", "nope"], ["--task", "'nope'", "choose from"]),
]


@pytest.mark.parametrize(("argv", "fragments"), [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_bad_cli_argument_exits_2_naming_option_value_and_valid_range(argv, fragments, capsys, no_model_loading):
    with pytest.raises(SystemExit) as info:
        cli.main(["demo", *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} missing from: {err}"


def test_cli_output_dir_that_is_a_file_is_refused_by_name(tmp_path, capsys, no_model_loading):
    target = tmp_path / "out.txt"
    target.write_text("mine")
    with pytest.raises(SystemExit) as info:
        cli.main(["demo", "--output-dir", str(target)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert str(target) in err and "not a directory" in err
    assert target.read_text() == "mine"


# --- GGUF export


def _tile_int4_llama(tile=(32, 1), scale_dtype="float16", zero_dtype="float16"):
    return quantize_model(tiny_llama(), tile=tile, scale_dtype=scale_dtype, zero_dtype=zero_dtype)


GGUF_CASES = [
    ("gguf-tile-not-q4_1", lambda p: export_gguf(_tile_int4_llama(tile=(4, 8)), None, p), ValueError,
     ["q_proj", "tile=(4, 8)", "(32, 1)"]),
    ("gguf-fp32-zero-points", lambda p: export_gguf(_tile_int4_llama(zero_dtype="float32"), None, p), ValueError,
     ["q_proj", "float32", "zero_dtype='float16'"]),
    ("gguf-adapter-attached", lambda p: export_gguf(
        get_peft_model(_tile_int4_llama(), QABLoRAConfig(tile=(32, 1), target_modules=["q_proj"])), None, p),
     ValueError, ["q_proj", "merge_and_unload()"]),
    ("gguf-not-quantized", lambda p: export_gguf(tiny_llama(), None, p), ValueError,
     ["no tile-INT4 layer", "quantize_model(model, tile=(32, 1)", "allow_float=True"]),
    ("gguf-missing-folder", lambda p: export_gguf(_tile_int4_llama(), None, p.parent / "nope" / "m.gguf"),
     FileNotFoundError, ["nope", "does not exist"]),
]  # fmt: skip


@pytest.mark.parametrize(("call", "error", "fragments"), [c[1:] for c in GGUF_CASES], ids=[c[0] for c in GGUF_CASES])
def test_bad_gguf_export_raises_a_named_error(tmp_path, call, error, fragments):
    pytest.importorskip("gguf")
    path = tmp_path / "model.gguf"
    with pytest.raises(error) as info:
        call(path)
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} missing from: {info.value}"
    assert not path.exists() and not list(tmp_path.iterdir())


def test_gguf_export_refuses_to_overwrite_an_existing_file(tmp_path):
    pytest.importorskip("gguf")
    path = tmp_path / "model.gguf"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match=re.escape(str(path)) + ".*overwrite=True"):
        export_gguf(_tile_int4_llama(), None, path)
    assert path.read_bytes() == b"precious"
