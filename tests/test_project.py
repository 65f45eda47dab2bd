"""Project hygiene: the README's set-up commands, CI, lint, and the package layout (library / demo / commands)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "peft_balanced"


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [block.strip() for block in blocks if "python3 -m venv" in block]


def test_readme_has_exactly_two_setup_commands_demo_and_tests():
    commands = readme_commands()
    assert len(commands) == 2
    assert "peft-balanced demo" in commands[0]
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command():
    assert readme_commands()[1] in (ROOT / ".ci" / "run").read_text()


def test_code_is_ruff_clean():
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "peft_balanced", "tests"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-3000:]


def imported_modules(path: Path) -> set[str]:
    """Absolute names of what ``path`` imports, at any depth (relative imports resolved; for ``from m import x``
    both ``m`` and ``m.x``, which may be a submodule)."""
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    package = module.removesuffix(".__init__") if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            source = ".".join(part for part in (base, node.module) if part)
            names |= {source} | {f"{source}.{alias.name}" for alias in node.names}
    return names


def test_the_library_imports_neither_the_demo_nor_the_commands():
    """Only the commands (``cli/``) import ``cli/``; the library (all but ``cli/`` and ``demo/``) imports neither."""
    forbidden_in = {"cli": (), "demo": ("peft_balanced.cli",)}
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        forbidden = forbidden_in.get(path.relative_to(PACKAGE).parts[0], ("peft_balanced.cli", "peft_balanced.demo"))
        for name in sorted(imported_modules(path)):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert offenders == []


def test_importing_the_package_loads_neither_the_demo_nor_the_commands():
    code = (
        "import sys, peft_balanced; "
        "print(sorted(m for m in sys.modules if m.startswith(('peft_balanced.demo', 'peft_balanced.cli'))))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"


BENCHMARK_GROUPS = {"accuracy", "kernels", "speed", "studies"}


def test_benchmarks_are_grouped_by_purpose_and_no_source_file_is_over_500_lines():
    """Every benchmark script sits in one group folder (run as ``python benchmarks/<group>/<script>.py``), and no
    Python file of the package, the tests or the benchmarks has more than 500 lines (CONTRIBUTING.md, Style)."""
    scripts = sorted((ROOT / "benchmarks").rglob("*.py"))
    assert scripts
    misplaced = [str(p.relative_to(ROOT)) for p in scripts if p.parent.parent.name != "benchmarks"]
    assert misplaced == []
    assert {p.parent.name for p in scripts} == BENCHMARK_GROUPS
    sources = [*scripts, *PACKAGE.rglob("*.py"), *(ROOT / "tests").rglob("*.py")]
    long = [f"{p.relative_to(ROOT)}: {n}" for p in sources if (n := len(p.read_text().splitlines())) > 500]
    assert long == []


def _tutorial_cells(path: Path) -> list[dict]:
    import json

    return json.loads(path.read_text(encoding="utf-8"))["cells"]


TUTORIALS = sorted((ROOT / "tutorials").glob("*.ipynb"))


def test_the_five_tutorials_are_there():
    assert [p.name[:2] for p in TUTORIALS] == ["01", "02", "03", "04", "05"]


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_every_tutorial_asserts_plots_cites_and_keeps_one_gpu_cell_out_of_the_tests(path):
    cells = _tutorial_cells(path)
    run = [
        "".join(c["source"])
        for c in cells
        if c["cell_type"] == "code" and "nbval-skip" not in c["metadata"].get("tags", [])
    ]
    skipped = [c for c in cells if "nbval-skip" in c["metadata"].get("tags", [])]
    prose = "".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    assert any(re.search(r"^\s*assert ", source, flags=re.M) for source in run)
    assert any("plt." in source for source in run)
    assert "matplotlib.use(" not in "".join(run)  # a non-interactive backend would hide the plots in Jupyter
    assert len(skipped) == 1 and "cuda" in "".join(skipped[0]["source"])
    assert re.search(r"et al\.,? [^)]*\d{4}", prose)  # the idea's paper
