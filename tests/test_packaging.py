"""Packaging: the package states what it needs; the CPU-wheel pin lives only in the README's set-up commands."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Upper bounds with a tested reason. peft: the plugin extends peft's PeftType enum and tuner internals, which change
# between minor releases (the cap is reviewed with each peft release).
CAPPED_FOR_A_REASON = {"peft"}


def requirements() -> list[str]:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [req for group in project["optional-dependencies"].values() for req in group]
    return project["dependencies"] + extras


def name_of(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower()


def test_no_requirement_has_an_upper_bound_without_a_reason():
    capped = [r for r in requirements() if re.search(r"<|~=|==", r) and name_of(r) not in CAPPED_FOR_A_REASON]
    assert capped == []


def test_torch_is_required_without_a_pin():
    torch = [r for r in requirements() if name_of(r) == "torch"]
    assert torch == ["torch>=2.4"]


def test_readme_setup_commands_install_the_cpu_torch_in_the_same_pip_call_as_the_package():
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    commands = [b for b in blocks if "python3 -m venv" in b]
    pinned_install = r"pip install -q -c constraints\.txt torch==2\.13\.0 -e \"\.\[\w+\]\""
    assert commands and all(re.search(pinned_install, c) for c in commands)


def test_console_script_routes_the_sft_subcommand_to_trls_parser(capsys):
    tomllib = pytest.importorskip("tomllib")
    target = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["peft-balanced"]
    module_name, _, attribute = target.partition(":")
    entry_point = getattr(importlib.import_module(module_name), attribute)
    with pytest.raises(SystemExit) as info:
        entry_point(["sft", "--help"])
    assert info.value.code == 0
    assert "--peft_method" in capsys.readouterr().out
