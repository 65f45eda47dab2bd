"""Whether the Triton kernels can run here: CUDA present, Triton (>= 3.0, for ``tl.interleave``) importable, and
the kernel preference (``peft_balanced.settings``) allowing them."""

from __future__ import annotations

import os

import torch

from ...settings import triton_allowed

__all__ = ["triton_available", "triton_interpreting"]


_triton_found: bool | None = None  # decided once per process, at the first question


@torch.compiler.assume_constant_result  # under torch.compile: asked once when tracing, a constant in the graph
def _triton_importable() -> bool:
    global _triton_found
    if _triton_found is None:
        try:
            import triton  # noqa: F401
            import triton.language as tl
        except Exception:
            _triton_found = False
        else:
            _triton_found = hasattr(tl, "interleave")
    return _triton_found


def triton_available() -> bool:
    """True when the Triton kernels can run: allowed by the kernel preference, CUDA present, Triton importable."""
    return triton_allowed() and torch.cuda.is_available() and _triton_importable()


def triton_interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1``: Triton runs kernels on CPU tensors with numpy (the kernel tests use it)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
