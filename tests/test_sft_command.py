"""``peft-balanced sft``: each method trains a tiny saved Llama from local data files; adapters reload; ``--merge``
gives a model equal to the adapter model; wrong combinations fail before any model loads."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from origin import deprecations_from, recorded_warnings
from peft import PeftModel
from tiny import tiny_llama, tiny_tokenizer
from tiny_demo import tiny_chat_tokenizer, use_tiny_demo_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import peft_balanced
from peft_balanced import TileInt4Config, TileInt4Linear, cli
from peft_balanced.cli.sft import BalancedArguments, make_parser

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIR = str(Path(peft_balanced.__file__).parent)
TRAIN_FLAGS = [
    "--use_cpu", "--max_steps", "3", "--per_device_train_batch_size", "4", "--max_length", "32",
    "--learning_rate", "1e-2", "--lr_scheduler_type", "constant", "--report_to", "none", "--save_strategy", "no",
    "--logging_steps", "1", "--disable_tqdm", "true", "--seed", "0",
]  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A saved tiny Llama with a character tokenizer that has a chat template."""
    path = tmp_path_factory.mktemp("tiny_model")
    tiny_llama(initializer_range=0.1).save_pretrained(path)
    tiny_chat_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def config_only_dir(tmp_path_factory) -> Path:
    """A model directory with config.json but no weights: loading a model from it fails."""
    path = tmp_path_factory.mktemp("config_only")
    tiny_llama().config.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """The same small task as 'messages' jsonl, 'prompt/completion' jsonl and 'text' parquet."""
    from datasets import Dataset

    path = tmp_path_factory.mktemp("data")
    rows = [(f"{i % 10} plus 1?", f"{i % 10 + 1}") for i in range(32)]
    with open(path / "messages.jsonl", "w") as handle:
        for q, a in rows:
            messages = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            handle.write(json.dumps({"messages": messages}) + "\n")
    with open(path / "prompt_completion.jsonl", "w") as handle:
        for q, a in rows:
            handle.write(json.dumps({"prompt": q + " ", "completion": a}) + "\n")
    Dataset.from_dict({"text": [f"{q} {a}." for q, a in rows]}).to_parquet(str(path / "text.parquet"))
    return path


def run_sft(model_dir: Path, data: Path, out: Path, *flags: str) -> Path:
    argv = ["sft", "--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--output_dir", str(out)]
    assert cli.main([*argv, *TRAIN_FLAGS, *flags]) == 0
    return out


@torch.no_grad()
def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    return model.eval()(tokens).logits.float()


def probe() -> torch.Tensor:
    return torch.tensor([tiny_tokenizer()("3 plus 1? 4.")["input_ids"]])


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def blora_run(model_dir, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("blora") / "out"
    with recorded_warnings() as records:
        run_sft(model_dir, data_dir / "messages.jsonl", out, "--peft_method", "blora", "--lora_r", "4", "--merge")
    return out, records


def test_blora_adapter_from_messages_jsonl_reloads_and_merged_model_equals_it(blora_run, model_dir):
    out, _ = blora_run
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "BLORA"
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    base_logits = logits(base, probe())
    adapted = logits(PeftModel.from_pretrained(base, out), probe())
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert not any(hasattr(m, "base_layer") for m in merged.modules())
    assert relative_error(adapted, base_logits) > 1e-3  # training moved the adapter
    assert relative_error(logits(merged, probe()), adapted) < 1e-5


def test_a_short_run_emits_no_deprecation_warning_caused_by_peft_balanced(blora_run):
    _, records = blora_run
    assert deprecations_from(records, PACKAGE_DIR) == []
    with recorded_warnings() as control:  # the recorder sees this kind of notice and blames the caller
        assert not tiny_llama().is_gradient_checkpointing
    assert [r.category for r in deprecations_from(control, __file__)] == [FutureWarning]


def test_qablora_from_prompt_completion_jsonl_merges_into_a_4bit_model_equal_to_the_adapter(
    model_dir, data_dir, tmp_path
):
    flags = ["--peft_method", "qablora", "--load_in_4bit", "--tile", "4,8", "--lora_alpha", "1", "--merge"]
    out = run_sft(model_dir, data_dir / "prompt_completion.jsonl", tmp_path / "out", *flags)
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "QABLORA"
    base = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=TileInt4Config(tile=(4, 8)))
    base_logits = logits(base, probe())
    adapted = logits(PeftModel.from_pretrained(base, out), probe())
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")  # plain from_pretrained: tile INT4 again
    assert isinstance(merged.model.layers[0].mlp.down_proj, TileInt4Linear)
    assert relative_error(adapted, base_logits) > 1e-3
    assert relative_error(logits(merged, probe()), adapted) < 1e-5  # float32 zero points: exact up to rounding


def test_gradapprox_from_text_parquet_initialises_from_the_gradient_and_merges_exactly(model_dir, data_dir, tmp_path):
    flags = ["--peft_method", "gradapprox", "--lora_r", "4", "--gradapprox_init_batches", "2", "--merge"]
    out = run_sft(model_dir, data_dir / "text.parquet", tmp_path / "out", *flags)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    base_logits = logits(base, probe())
    peft_model = PeftModel.from_pretrained(base, out)
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.gax_B0["default"].abs().sum() > 0  # GradApproxInitCallback ran (LoRA's init has B = 0)
    adapted = logits(peft_model, probe())
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert relative_error(adapted, base_logits) > 1e-3
    assert relative_error(logits(merged, probe()), adapted) < 1e-5


def test_q_blora_on_nf4_merges_into_a_dense_model_equal_to_the_adapter(model_dir, data_dir, tmp_path):
    flags = ["--peft_method", "blora", "--load_in_4bit", "--balance_factor", "4", "--lora_r", "2", "--merge"]
    out = run_sft(model_dir, data_dir / "messages.jsonl", tmp_path / "out", *flags)
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=nf4, device_map="cpu")
    adapted = logits(PeftModel.from_pretrained(base, out), probe())
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert "quantization_config" not in json.loads((out / "merged" / "config.json").read_text())
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert relative_error(logits(merged, probe()), adapted) < 1e-5


def test_merged_dtype_bfloat16_saves_a_16bit_model(model_dir, data_dir, tmp_path):
    flags = ["--peft_method", "blora", "--max_steps", "1", "--merge", "--merged_dtype", "bfloat16"]
    out = run_sft(model_dir, data_dir / "text.parquet", tmp_path / "out", *flags)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype="auto")
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


WRONG_FLAGS = [
    (["--peft_method", "blora", "--tile", "4,8"], "--tile cannot be used with --peft_method blora"),
    (["--peft_method", "gradapprox", "--tile", "4,8"], "--tile cannot be used with --peft_method gradapprox"),
    (
        ["--peft_method", "qablora", "--balance_factor", "2"],
        "--balance_factor cannot be used with --peft_method qablora",
    ),
    (["--peft_method", "gradapprox", "--balance_factor", "2"], "--balance_factor cannot be used with --peft_method"),
    (["--peft_method", "qablora", "--lora_r", "8"], "--lora_r cannot be used with --peft_method qablora"),
    (["--peft_method", "qablora", "--load_in_8bit"], "--load_in_8bit cannot be used with --peft_method qablora"),
    (["--peft_method", "qablora", "--bnb_4bit_quant_type", "fp4"], "not bitsandbytes"),
    (["--peft_method", "qablora", "--merged_dtype", "float16"], "keeps the model 4-bit"),
    (["--peft_method", "blora", "--approximator_depth", "2"], "--approximator_depth cannot be used with"),
    (["--peft_method", "gradapprox", "--approximator_depth", "6"], "--approximator_depth must be 0 (off) or 1..5"),
    (["--peft_method", "qablora", "--tile", "4"], "--tile must be two positive integers"),
    (["--peft_method", "blora", "--balance_factor", "0"], "--balance_factor must be a positive integer"),
    (["--peft_method", "blora", "--use_dora"], "--use_dora is a LoRA option"),
    (["--peft_method", "gradapprox", "--use_lora_lr"], "--use_lora_lr cannot be used with --peft_method gradapprox"),
    (["--merged_output_dir", "somewhere"], "--merged_output_dir needs --merge"),
]


@pytest.mark.parametrize(("flags", "message"), WRONG_FLAGS, ids=[" ".join(f) for f, _ in WRONG_FLAGS])
def test_wrong_combinations_fail_before_the_model_is_read(flags, message, data_dir, tmp_path, capsys):
    argv = ["sft", "--model_name_or_path", str(tmp_path / "no-such-model"), "--use_cpu", "--output_dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exc:
        cli.main([*argv, "--dataset_name", str(data_dir / "text.parquet"), *flags])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


SHAPE_ERRORS = [
    (["--peft_method", "blora", "--balance_factor", "3"], "--balance_factor 3 does not divide q_proj (D_in=64"),
    (["--peft_method", "qablora", "--load_in_4bit", "--tile", "4,3"], "--tile 4,3 does not fit q_proj"),
    (["--peft_method", "qablora"], "pass --load_in_4bit"),
]


@pytest.mark.parametrize(("flags", "message"), SHAPE_ERRORS, ids=[" ".join(f) for f, _ in SHAPE_ERRORS])
def test_model_shape_errors_come_from_config_json_before_any_weights_load(
    flags, message, config_only_dir, data_dir, tmp_path, capsys
):
    argv = ["sft", "--model_name_or_path", str(config_only_dir), "--use_cpu", "--output_dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exc:
        cli.main([*argv, "--dataset_name", str(data_dir / "text.parquet"), *flags])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_balance_factor_error_lists_the_valid_factors(config_only_dir, data_dir, tmp_path, capsys):
    argv = ["sft", "--model_name_or_path", str(config_only_dir), "--dataset_name", str(data_dir / "text.parquet")]
    with pytest.raises(SystemExit):
        cli.main([*argv, "--use_cpu", "--output_dir", str(tmp_path), "--balance_factor", "3"])
    assert "[1, 2, 4, 8, 16, 32]" in capsys.readouterr().err  # divisors of gcd(64, 128, 32)


def test_missing_data_file_and_non_empty_merged_dir_fail_before_loading(config_only_dir, tmp_path, capsys):
    base = ["sft", "--model_name_or_path", str(config_only_dir), "--use_cpu", "--output_dir", str(tmp_path / "o")]
    with pytest.raises(SystemExit):
        cli.main([*base, "--dataset_name", str(tmp_path / "missing.jsonl")])
    assert "missing.jsonl: no such file" in capsys.readouterr().err
    (tmp_path / "data.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit):
        cli.main([*base, "--dataset_name", str(tmp_path / "data.jsonl"), "--merge", "--merged_output_dir", str(tmp_path / "merged")])  # fmt: skip
    assert "is not empty" in capsys.readouterr().err
    assert (tmp_path / "merged" / "keep.txt").read_text() == "mine"


def test_help_documents_every_flag_of_ours_and_the_reused_modelconfig_flags(capsys):
    parser = make_parser("peft-balanced sft")
    undocumented = [a.dest for a in parser._actions if a.dest != "help" and not (a.help or "").strip()]
    assert undocumented == []
    with pytest.raises(SystemExit):
        cli.main(["sft", "--help"])
    text = capsys.readouterr().out
    for flag in [
        *BalancedArguments.__dataclass_fields__,
        "lora_r",
        "lora_alpha",
        "lora_target_modules",
        "load_in_4bit",
    ]:
        assert f"--{flag}" in text
    assert "QA-BLoRA only" in text and "tile INT4 format" in text.replace("\n", " ").replace("  ", " ")


def test_top_level_help_lists_sft(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "sft" in capsys.readouterr().out


def test_example_script_trains_and_saves_an_adapter(model_dir, data_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    argv = ["sft.py", "--model_name_or_path", str(model_dir), "--dataset_name", str(data_dir / "text.parquet")]
    monkeypatch.setattr(sys, "argv", [*argv, "--output_dir", str(out), *TRAIN_FLAGS, "--max_steps", "1"])
    runpy.run_path(str(ROOT / "examples" / "sft.py"), run_name="__main__")
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "BLORA"


def test_the_demo_emits_no_deprecation_warning_caused_by_peft_balanced(tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    use_tiny_demo_model(monkeypatch)
    argv = ["demo", "--output-dir", str(tmp_path), "--steps", "1", "--batch-size", "2", "--eval-size", "2"]
    with recorded_warnings() as records:
        assert cli.main([*argv, "--no-progress"]) == 0
    assert deprecations_from(records, PACKAGE_DIR) == []


def test_checkpointing_keeps_trls_default_on_and_an_explicit_flag_still_turns_it_off():
    def training_args(*flags):
        return make_parser().parse_args_and_config(["--use_cpu", "--output_dir", "x", *flags])[1]

    defaults = training_args()
    explicit = training_args("--gradient_checkpointing", "false")
    new_name = training_args("--activation_checkpointing", "false")
    assert defaults.gradient_checkpointing is True
    assert explicit.gradient_checkpointing is False and new_name.gradient_checkpointing is False


@pytest.fixture(scope="module")
def tile_int4_dir(tmp_path_factory) -> Path:
    """A tiny Llama saved in the 4x8 tile-INT4 format (``quantize_model`` + ``save_pretrained``)."""
    path = tmp_path_factory.mktemp("tile_int4")
    peft_balanced.quantize_model(tiny_llama(initializer_range=0.1), tile=(4, 8)).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_qablora_trains_from_a_tile_int4_checkpoint_without_load_in_4bit(tile_int4_dir, data_dir, tmp_path):
    out = run_sft(tile_int4_dir, data_dir / "text.parquet", tmp_path / "out", "--peft_method", "qablora")
    assert json.loads((out / "adapter_config.json").read_text())["tile"] == [4, 8]


def test_a_tile_that_differs_from_the_checkpoints_fails_before_loading(tile_int4_dir, data_dir, tmp_path, capsys):
    argv = ["sft", "--model_name_or_path", str(tile_int4_dir), "--dataset_name", str(data_dir / "text.parquet")]
    with pytest.raises(SystemExit):
        cli.main([*argv, "--use_cpu", "--output_dir", str(tmp_path), "--peft_method", "qablora", "--tile", "8,8"])
    assert "--tile 8,8 does not match the tile 4,8" in capsys.readouterr().err


def test_a_glob_of_local_files_is_one_train_split(tmp_path):
    from trl import ScriptArguments

    from peft_balanced.cli.sft import load_sft_dataset

    for part in range(2):
        (tmp_path / f"part{part}.jsonl").write_text(
            "".join(json.dumps({"text": f"{part}-{i}"}) + "\n" for i in range(3))
        )
    dataset = load_sft_dataset(ScriptArguments(dataset_name=str(tmp_path / "part*.jsonl")))
    assert sorted(dataset) == ["train"] and dataset["train"].num_rows == 6


REMOTE_CODE = "--trust_remote_code"


@pytest.mark.parametrize("flags", [[REMOTE_CODE], ["--model_init_kwargs", json.dumps({REMOTE_CODE[2:]: True})]])
def test_remote_code_is_refused_before_any_model_loads(flags, config_only_dir, data_dir, tmp_path, capsys):
    argv = ["sft", "--model_name_or_path", str(config_only_dir), "--use_cpu", "--output_dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exc:
        cli.main([*argv, "--dataset_name", str(data_dir / "text.parquet"), *flags])
    assert exc.value.code == 2
    assert f"{REMOTE_CODE} is refused" in capsys.readouterr().err


# --- the built-in model: --model_name_or_path default


def test_default_model_is_converted_once_into_the_cache(tmp_path, monkeypatch):
    from tiny_demo import use_tiny_demo_model

    from peft_balanced.cli import model_source
    from peft_balanced.demo import models

    monkeypatch.setenv("PEFT_BALANCED_CACHE", str(tmp_path / "cache"))
    use_tiny_demo_model(monkeypatch)
    loads = []
    loader = models.load_default_model
    monkeypatch.setattr(models, "load_default_model", lambda **kw: loads.append(kw) or loader(**kw))
    first = model_source.resolve_model("default")
    assert model_source.resolve_model("default") == first and len(loads) == 1
    assert Path(first).parent.parent == tmp_path / "cache" and (Path(first) / "config.json").is_file()


def test_sft_trains_on_the_default_model(data_dir, tmp_path, monkeypatch):
    from tiny_demo import use_tiny_demo_model

    monkeypatch.setenv("PEFT_BALANCED_CACHE", str(tmp_path / "cache"))
    use_tiny_demo_model(monkeypatch)
    out = run_sft("default", data_dir / "text.parquet", tmp_path / "out", "--max_steps", "1")
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "BLORA"


def test_a_missing_gguf_file_is_named(data_dir, tmp_path, capsys):
    argv = [
        "sft",
        "--model_name_or_path",
        str(tmp_path / "nope.gguf"),
        "--dataset_name",
        str(data_dir / "text.parquet"),
    ]
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "--output_dir", str(tmp_path / "out"), *TRAIN_FLAGS])
    assert exit_info.value.code == 2
    assert "nope.gguf: no such GGUF file" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["blora", "qablora"])
def test_use_lora_lr_reaches_the_adapter_config(method):
    from trl import ModelConfig

    from peft_balanced.cli.sft import SFTPlan, build_peft_config

    plan = SFTPlan(target_modules="all-linear", tile=(4, 8), merged_dir=None, given=set())
    config = build_peft_config(BalancedArguments(peft_method=method, use_lora_lr=True), ModelConfig(), plan)
    assert config.use_lora_lr is True
