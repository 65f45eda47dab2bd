"""Whether the Triton kernels can run here: CUDA present, Triton (>= 3.0, for ``tl.interleave``) importable, and
the kernel preference (``peft_balanced.settings``) allowing them."""

from __future__ import annotations

import functools
import os

import torch

from ...settings import triton_allowed

__all__ = ["triton_available", "triton_interpreting"]


@functools.lru_cache(maxsize=1)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language as tl
    except Exception:
        return False
    return hasattr(tl, "interleave")


def triton_available() -> bool:
    """True when the Triton kernels can run: allowed by the kernel preference, CUDA present, Triton importable."""
    return triton_allowed() and torch.cuda.is_available() and _triton_importable()


def triton_interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1``: Triton runs kernels on CPU tensors with numpy (the kernel tests use it)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
