"""Whether the Triton kernels can run here (CUDA present, Triton >= 3.0 importable for ``tl.interleave``, the kernel
preference of ``peft_balanced.settings`` allowing them), and how they become ``torch.library`` ops."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch

from ...settings import triton_allowed
from ..tile_int4 import TileInt4Weight

__all__ = ["TRITON_OPS", "define_triton_op", "matmul_op", "triton_available", "triton_interpreting"]


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


# The kernels are ``torch.library.triton_op`` ops (torch >= 2.6): dynamo records the op and never traces the building
# of a kernel, and inductor traces the op's body and launches the kernel from its own generated code.
TRITON_OPS = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")


def _registered(name: str) -> bool:
    try:
        getattr(torch.ops.peft_balanced, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def define_triton_op(name: str, function):
    """``torch.library.triton_op("peft_balanced::<name>")`` once per process: a custom op whose body inductor traces,
    so compiled code launches its Triton kernel directly (no per-call Python dispatch; the body must launch its
    kernels through ``torch.library.wrap_triton``). The body is also the op's fake implementation.

    Without Triton installed (a CPU machine) torch logs "Triton not available" while it looks for kernels in the body;
    the op still works there (its body falls back to torch), so that one record is kept out of the user's log.
    """
    if _registered(name):
        return None
    finder_log = logging.getLogger("torch._library.triton")
    level = finder_log.level
    finder_log.setLevel(logging.ERROR)
    try:
        return torch.library.triton_op(f"peft_balanced::{name}", function, mutates_args=())
    finally:
        finder_log.setLevel(level)


MatmulLaunch = Callable[..., torch.Tensor]  # (x, weight, bias, out_dtype, config, traced) -> y


def matmul_op(name: str, launch: MatmulLaunch, config_keys: tuple[str, ...]) -> MatmulLaunch:
    """A tile-INT4 matmul kernel as ``run(x, weight, bias, out_dtype, config)``: eager calls run
    ``launch(x, weight, bias, out_dtype, config)``; under ``torch.compile`` the call is the Triton op
    ``peft_balanced::<name>`` (registered here; the tile and ``config``'s values, in ``config_keys`` order, travel as
    ints), whose body is ``launch(..., traced=True)``."""

    def body(
        x: torch.Tensor,
        packed: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        l1: int,
        l2: int,
        bias: torch.Tensor | None,
        out_dtype: torch.dtype,
        config: list[int],
    ) -> torch.Tensor:
        weight = TileInt4Weight(packed, scale, zero, (l1, l2))
        return launch(x, weight, bias, out_dtype, dict(zip(config_keys, config, strict=True)), traced=True)

    if TRITON_OPS:
        define_triton_op(name, body)

    def run(
        x: torch.Tensor, weight: TileInt4Weight, bias: torch.Tensor | None, out_dtype: torch.dtype, config: dict
    ) -> torch.Tensor:
        packed, scale, zero, tile = weight
        weight = TileInt4Weight(packed.contiguous(), scale.contiguous(), zero.contiguous(), tile)
        x = x.contiguous()
        if TRITON_OPS and torch.compiler.is_compiling() and not triton_interpreting():
            op = getattr(torch.ops.peft_balanced, name)
            return op(x, *weight[:3], *tile, bias, out_dtype, [int(config[key]) for key in config_keys])
        return launch(x, weight, bias, out_dtype, config)

    return run
