"""Files the package writes and reads: atomic replacement of adapter checkpoints, interrupted writes that leave the
old checkpoint intact, pickles that are never unpickled, no remote code."""

from __future__ import annotations

import ast
import json
import os
import pickle
import re
from pathlib import Path

import pytest
import safetensors.torch
import torch
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model
from tiny import tiny_llama
from tiny_demo import use_tiny_demo_model

from peft_balanced import BLoRAConfig, cli
from peft_balanced.cli import demo as demo_command

ROOT = Path(__file__).resolve().parent.parent


def _adapter(seed: int):
    model = get_peft_model(tiny_llama(), BLoRAConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False))
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.normal_(generator=torch.Generator().manual_seed(seed))
    return model


def _adapter_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if ".bal_" in k}


def _loaded_state(path: Path) -> dict[str, torch.Tensor]:
    return _adapter_state(PeftModel.from_pretrained(tiny_llama(), str(path)))


def _assert_same(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)


def test_saving_over_an_adapter_replaces_each_file_with_a_new_one(tmp_path):
    _adapter(0).save_pretrained(tmp_path)
    before = {name: os.stat(tmp_path / name).st_ino for name in ("adapter_model.safetensors", "adapter_config.json")}
    new = _adapter(1)
    new.save_pretrained(tmp_path)
    for name, inode in before.items():
        assert os.stat(tmp_path / name).st_ino != inode, f"{name} was rewritten in place"
    _assert_same(_loaded_state(tmp_path), _adapter_state(new))
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_weights_write_interrupted_midway_leaves_the_old_adapter_loadable(tmp_path, monkeypatch):
    old = _adapter(0)
    old.save_pretrained(tmp_path)
    real_save = safetensors.torch.save_file

    def crash_halfway(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", crash_halfway)
    with pytest.raises(OSError, match="No space left"):
        _adapter(1).save_pretrained(tmp_path)
    monkeypatch.undo()
    _assert_same(_loaded_state(tmp_path), _adapter_state(old))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


def test_config_write_interrupted_midway_leaves_the_old_config(tmp_path, monkeypatch):
    _adapter(0).save_pretrained(tmp_path)
    before = (tmp_path / "adapter_config.json").read_text()
    real_write_text = Path.write_text

    def crash_halfway(self, text, *args, **kwargs):
        real_write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError("No space left on device")

    monkeypatch.setattr(Path, "write_text", crash_halfway)
    with pytest.raises(OSError, match="No space left"):
        BLoRAConfig(r=8, balance_factor=4, target_modules=["q_proj"]).save_pretrained(str(tmp_path))
    monkeypatch.undo()
    assert (tmp_path / "adapter_config.json").read_text() == before
    assert json.loads(before)["r"] == 4
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# --- pickles


class _CreatesMarker:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant_pickle(directory: Path, marker: Path) -> None:
    (directory / "adapter_model.safetensors").unlink()
    with open(directory / "adapter_model.bin", "wb") as handle:
        pickle.dump({"weights": _CreatesMarker(marker)}, handle)


def test_the_crafted_pickle_would_run_code_if_unpickled(tmp_path):
    marker = tmp_path / "MARKER"
    pickle.loads(pickle.dumps(_CreatesMarker(marker)))
    assert marker.exists()


def test_pickled_blora_weights_are_refused_unread(tmp_path, saved_tiny_llama):
    adapter = tmp_path / "adapter"
    _adapter(0).save_pretrained(adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = saved_tiny_llama
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    marker = tmp_path / "MARKER"
    _plant_pickle(adapter, marker)
    with pytest.raises(ValueError, match=re.escape(str(adapter / "adapter_model.bin")) + ".*pickle"):
        PeftModel.from_pretrained(tiny_llama(), str(adapter))
    with pytest.raises(ValueError, match="safetensors only"):
        AutoPeftModelForCausalLM.from_pretrained(str(adapter))
    assert not marker.exists()


def test_saving_blora_as_a_pickle_is_refused_at_save_time(tmp_path):
    with pytest.raises(ValueError, match=r"adapter_model\.bin.*safe_serialization=True"):
        _adapter(0).save_pretrained(tmp_path, safe_serialization=False)
    assert not (tmp_path / "adapter_config.json").exists()


def test_pickled_lora_weights_hit_peft_weights_only_refusal(tmp_path):
    adapter = tmp_path / "lora"
    get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)
    marker = tmp_path / "MARKER"
    _plant_pickle(adapter, marker)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        PeftModel.from_pretrained(tiny_llama(), str(adapter))
    assert not marker.exists()


def _offenders(folders: tuple[str, ...], pattern: re.Pattern) -> list[str]:
    found = []
    for folder in folders:
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".ipynb", ".md") and path != Path(__file__):
                found += [f"{path.relative_to(ROOT)}: {m.group(0)}" for m in pattern.finditer(path.read_text())]
    return found


def _remote_code_switches(source: str) -> list[str]:
    """Every ``trust_remote_code=<x>`` keyword and ``{"trust_remote_code": <x>}`` entry of ``source`` whose value is not
    the constant ``False``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        pairs = []
        if isinstance(node, ast.Call):
            pairs = [(k.arg, k.value) for k in node.keywords]
        elif isinstance(node, ast.Dict):
            pairs = [(k.value, v) for k, v in zip(node.keys, node.values, strict=True) if isinstance(k, ast.Constant)]
        found += [
            f"line {value.lineno}: {ast.unparse(value)}"
            for name, value in pairs
            if name == "trust_remote_code" and not (isinstance(value, ast.Constant) and value.value is False)
        ]
    return found


def _python_sources(folders: tuple[str, ...]):
    for folder in folders:
        for path in (ROOT / folder).rglob("*"):
            if path.suffix == ".py":
                yield path, path.read_text()
            elif path.suffix == ".ipynb":
                cells = json.loads(path.read_text())["cells"]
                code = [c["source"] for c in cells if c["cell_type"] == "code"]
                cells = ["".join(cell) if isinstance(cell, list) else cell for cell in code]
                kept = [
                    "\n".join(ln for ln in cell.splitlines() if not ln.lstrip().startswith(("%", "!")))
                    for cell in cells
                ]
                yield path, "\n".join(kept)


def test_no_code_passes_trust_remote_code_other_than_false():
    offenders = [
        f"{path.relative_to(ROOT)} {switch}"
        for path, source in _python_sources(("peft_balanced", "benchmarks", "tutorials"))
        for switch in _remote_code_switches(source)
    ]
    assert not offenders


def test_the_remote_code_check_sees_a_switch_in_a_call_and_in_a_dict():
    source = "f(trust_remote_code=True)\ng(trust_remote_code=flag)\nh(**{'trust_remote_code': 1})\nk(trust_remote_code=False)"
    assert len(_remote_code_switches(source)) == 3


def test_nothing_unpickles_unsafely():
    pattern = re.compile(r"weights_only\s*=\s*False")
    assert not _offenders(("peft_balanced", "tests", "benchmarks", "tutorials", "docs"), pattern)


def test_package_reads_no_pickles():
    pattern = re.compile(r"import pickle|pickle\.loads?\(|torch\.load\((?![^)]*weights_only=True)")
    assert not _offenders(("peft_balanced",), pattern)


# --- the demo's outputs


def test_failed_demo_run_leaves_previous_outputs_and_no_staging(tmp_path, monkeypatch):
    use_tiny_demo_model(monkeypatch)

    def crash(*args, **kwargs):
        raise RuntimeError("killed while merging")

    monkeypatch.setattr(demo_command, "merge_to_dense", crash)
    out = tmp_path / "demo"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "adapter_config.json").write_text("old adapter")
    (out / "summary.json").write_text("old summary")
    argv = ["demo", "--output-dir", str(out), "--overwrite", "--steps", "1", "--batch-size", "2", "--eval-size", "2",
            "--quantization", "none", "--no-progress"]  # fmt: skip
    with pytest.raises(RuntimeError, match="killed while merging"):
        cli.main(argv)
    assert (out / "adapter" / "adapter_config.json").read_text() == "old adapter"
    assert (out / "summary.json").read_text() == "old summary"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]
