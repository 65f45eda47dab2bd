"""The ``peft-balanced`` command: argument errors, the output-dir guard, merging, and the demo on a tiny model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny import LLAMA_TARGETS, tiny_llama
from tiny_demo import use_tiny_demo_model
from torch import nn

import peft_balanced
from peft_balanced import cli
from peft_balanced.cli import demo as demo_command
from peft_balanced.demo import models
from peft_balanced.demo.merge import merge_to_dense


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail loudly if a command tries to load the real model."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(models, "load_default_model", refuse)


def test_demo_refuses_a_non_empty_output_dir(tmp_path, capsys, no_model_loading):
    (tmp_path / "keep.txt").write_text("precious")
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--output-dir", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err
    assert (tmp_path / "keep.txt").read_text() == "precious"


def test_demo_refuses_a_file_as_output_dir(tmp_path, capsys, no_model_loading):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--output-dir", str(target)])
    assert exc.value.code == 2 and "not a directory" in capsys.readouterr().err


def test_overwrite_removes_only_the_demo_outputs(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_model.safetensors").write_text("old")
    (tmp_path / "summary.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    demo_command._prepare_output_dir(tmp_path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    fresh = tmp_path / "new" / "dir"
    demo_command._prepare_output_dir(fresh, overwrite=False)
    assert fresh.is_dir()


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["bogus"],
        ["demo", "--steps", "0"],
        ["demo", "--steps", "ten"],
        ["demo", "--task", "nope"],
        ["demo", "--lr", "-1"],
        ["demo", "--lora-dropout", "1.5"],
        ["demo", "--method", "ia3"],
        ["demo", "--quantization", "int3"],
    ],
)
def test_argument_errors_exit_with_status_2(argv, capsys, no_model_loading):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


def test_help_lists_the_demo(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0 and "demo" in capsys.readouterr().out


def test_build_adapter_config():
    lora = demo_command.build_adapter_config("lora", r=4, lora_alpha=8, target_modules=LLAMA_TARGETS)
    assert isinstance(lora, LoraConfig) and lora.r == 4 and set(lora.target_modules) == set(LLAMA_TARGETS)
    blora = demo_command.build_adapter_config("blora", r=8, balance_factor=2, lora_alpha=16)
    assert isinstance(blora, peft_balanced.BLoRAConfig) and blora.balance_factor == 2 and blora.lora_alpha == 16
    assert blora.task_type == "CAUSAL_LM"
    with pytest.raises(cli.CLIError):
        demo_command.build_adapter_config("ia3")


@pytest.mark.parametrize("method", ["lora", "blora"])
def test_merge_to_dense_on_an_nf4_base_matches_the_adapter(method):
    pytest.importorskip("bitsandbytes")
    base = tiny_llama(initializer_range=0.1)
    models.quantize_linear_nf4(base)
    peft_model = get_peft_model(base, demo_command.build_adapter_config(method, r=4, lora_alpha=8))
    with torch.no_grad():  # make the adapter non-trivial
        for name, p in peft_model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(ids).logits
    merged = merge_to_dense(peft_model)
    projections = [m for n, m in merged.named_modules() if n.rsplit(".", 1)[-1] in LLAMA_TARGETS]
    assert len(projections) == 14 and all(type(m) is nn.Linear for m in projections)
    assert not getattr(merged, "is_loaded_in_4bit", False)
    with torch.no_grad():
        got = merged(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert merge_to_dense.__doc__


def test_merge_to_dense_refuses_a_projection_that_is_not_a_plain_linear():
    class SubclassedLinear(nn.Linear):
        pass

    class Merged(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = SubclassedLinear(2, 2)

    class FakePeftModel:
        def merge_and_unload(self, dequantize=False):
            return Merged()

    with pytest.raises(RuntimeError, match=r"plain torch.nn.Linear .*; got q_proj \(SubclassedLinear\)"):
        merge_to_dense(FakePeftModel())


def test_demo_end_to_end_on_a_tiny_model(tmp_path, monkeypatch, capsys):
    pytest.importorskip("bitsandbytes")
    use_tiny_demo_model(monkeypatch)
    out = tmp_path / "demo"
    argv = ["demo", "--output-dir", str(out), "--steps", "2", "--batch-size", "2", "--eval-size", "3", "--no-progress"]
    assert cli.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["method"] == "blora" and summary["eval_examples"] == 3
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["peft_type"] == "BLORA"
    assert (out / "merged" / "config.json").is_file() and (out / "merged" / "tokenizer.json").is_file()
    assert "quantization_config" not in json.loads((out / "merged" / "config.json").read_text())
    text = capsys.readouterr().out
    assert "exact match before" in text and "exact match merged 16-bit" in text
    # a second run needs --overwrite
    with pytest.raises(SystemExit):
        cli.main(argv)
    assert cli.main([*argv, "--overwrite"]) == 0


# --- peft-balanced probe


def test_probe_command_prints_the_table_and_a_recommendation(saved_tiny_llama, tmp_path, capsys):
    from datasets import Dataset
    from tiny import tiny_tokenizer

    model_dir = tmp_path / "model"
    shutil.copytree(saved_tiny_llama, model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    Dataset.from_dict({"text": [f"row {i}: some text to read" for i in range(8)]}).to_parquet(
        str(tmp_path / "d.parquet")
    )
    argv = ["probe", "--model_name_or_path", str(model_dir), "--dataset_name", str(tmp_path / "d.parquet")]
    assert cli.main([*argv, "--factors", "2,4", "--num_batches", "2", "--per_device_train_batch_size", "4"]) == 0
    out = capsys.readouterr().out
    assert "| 2 |" in out and "| 4 |" in out and "Recommendation:" in out


@pytest.mark.slow
def test_probe_command_runs_on_the_built_in_model(tmp_path, monkeypatch, capsys):
    from datasets import Dataset

    monkeypatch.setenv("PEFT_BALANCED_CACHE", str(tmp_path / "cache"))
    rows = [f"Practice {i}: {i} + {2 * i} = {3 * i}. {i} + {i} = {2 * i}." for i in range(8)]
    Dataset.from_dict({"text": rows}).to_parquet(str(tmp_path / "d.parquet"))
    argv = ["probe", "--model_name_or_path", "default", "--dataset_name", str(tmp_path / "d.parquet")]
    assert cli.main([*argv, "--num_batches", "1", "--per_device_train_batch_size", "4"]) == 0
    out = capsys.readouterr().out
    assert all(f"| {factor} |" in out for factor in (1, 2, 4, 8)) and "Recommendation:" in out


def test_probe_command_refuses_a_bad_factor_list(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["probe", "--model_name_or_path", "x", "--dataset_name", "y", "--factors", "2,zero"])
    assert exit_info.value.code == 2
    assert "comma-separated positive integers" in capsys.readouterr().err
