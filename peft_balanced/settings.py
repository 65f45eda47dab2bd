"""Run-time settings of the package: which kernels the quantized layers use.

One named setting replaces the environment flags that modules used to read on their own (torchao's
``KernelPreference`` in spirit)::

    peft_balanced.set_kernel_preference("torch")          # from now on
    with peft_balanced.kernel_preference("bitsandbytes"):  # for a block
        ...

While nothing is set, the old environment flags are read here, and only here, as aliases:
``PEFT_BALANCED_DISABLE_TRITON=1`` means ``"torch"`` and ``PEFT_BALANCED_DISABLE_FAST_NF4=1`` means
``"bitsandbytes"``.

Two more settings choose opt-in tile-INT4 kernels that are not yet measured on a GPU: the small-batch kernel
(``set_int4_gemv_kernel("split_k")``, default ``"fused"``) and up to how many tokens the fused dequantize-GEMM runs
instead of dequantize + cuBLAS (``set_int4_gemm_max_tokens(64)``, default 0: never).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum

from .validation import check_enum

__all__ = [
    "Int4GemvKernel",
    "KernelPreference",
    "get_int4_gemm_max_tokens",
    "get_int4_gemv_kernel",
    "get_kernel_preference",
    "int4_gemv_kernel",
    "kernel_preference",
    "set_int4_gemm_max_tokens",
    "set_int4_gemv_kernel",
    "set_kernel_preference",
]


class KernelPreference(str, Enum):
    """Which kernels quantized layers run.

    * ``AUTO``: our Triton kernels wherever they apply (CUDA): tile-INT4 dequantize and small-batch GEMV, and the
      NF4 training path for bitsandbytes ``Linear4bit`` bases.
    * ``BITSANDBYTES``: bitsandbytes' own kernels for its layers; the tile-INT4 Triton kernels stay on.
    * ``TORCH``: no Triton kernel at all: the torch reference paths, and bitsandbytes' own forward for its layers.
    """

    AUTO = "auto"
    BITSANDBYTES = "bitsandbytes"
    TORCH = "torch"


_preference: KernelPreference | None = None  # None: follow the environment aliases


def _is_set(variable: str) -> bool:
    return os.environ.get(variable, "0") not in ("", "0", "false", "False")


def get_kernel_preference() -> KernelPreference:
    """The preference in force: the one set, else the one the environment aliases give, else ``AUTO``."""
    if _preference is not None:
        return _preference
    if _is_set("PEFT_BALANCED_DISABLE_TRITON"):
        return KernelPreference.TORCH
    if _is_set("PEFT_BALANCED_DISABLE_FAST_NF4"):
        return KernelPreference.BITSANDBYTES
    return KernelPreference.AUTO


def set_kernel_preference(preference: KernelPreference | str | None) -> None:
    """Set the preference for the whole process; ``None`` goes back to the environment aliases."""
    global _preference
    _preference = None if preference is None else check_enum(KernelPreference, preference, "kernel preference")


@contextmanager
def kernel_preference(preference: KernelPreference | str) -> Iterator[KernelPreference]:
    """Use ``preference`` inside the ``with`` block and restore the previous setting after it."""
    global _preference
    previous, _preference = _preference, check_enum(KernelPreference, preference, "kernel preference")
    try:
        yield _preference
    finally:
        _preference = previous


def triton_allowed() -> bool:
    """Whether our Triton kernels may run (tile-INT4 and NF4)."""
    return get_kernel_preference() is not KernelPreference.TORCH


def fast_nf4_allowed() -> bool:
    """Whether bitsandbytes NF4 bases may take our NF4 training path instead of their own forward."""
    return get_kernel_preference() is KernelPreference.AUTO


class Int4GemvKernel(str, Enum):
    """Which kernel ``TileInt4Linear`` runs for the few tokens it sends to a fused kernel (Triton on CUDA only).

    * ``FUSED`` (default): ``quant/kernels/gemv.py``, one program per block of output rows over all of ``D_in``.
    * ``SPLIT_K``: ``quant/kernels/splitk.py``, several programs per output block along ``D_in`` (opt-in: not yet
      measured on a GPU); layers it does not support keep ``FUSED``.
    """

    FUSED = "fused"
    SPLIT_K = "split_k"


_int4_gemv = Int4GemvKernel.FUSED


def get_int4_gemv_kernel() -> Int4GemvKernel:
    """The tile-INT4 small-batch kernel in force (default ``FUSED``)."""
    return _int4_gemv


def set_int4_gemv_kernel(kernel: Int4GemvKernel | str) -> None:
    """Pick the tile-INT4 small-batch kernel for the whole process."""
    global _int4_gemv
    _int4_gemv = check_enum(Int4GemvKernel, kernel, "int4 gemv kernel")


@contextmanager
def int4_gemv_kernel(kernel: Int4GemvKernel | str) -> Iterator[Int4GemvKernel]:
    """Use ``kernel`` inside the ``with`` block and restore the previous choice after it."""
    global _int4_gemv
    previous, _int4_gemv = _int4_gemv, check_enum(Int4GemvKernel, kernel, "int4 gemv kernel")
    try:
        yield _int4_gemv
    finally:
        _int4_gemv = previous


_int4_gemm_max_tokens = 0


def get_int4_gemm_max_tokens() -> int:
    """Up to this many tokens (above the GEMV's range) ``TileInt4Linear`` runs the fused dequantize-GEMM
    (``quant/kernels/small_gemm.py``); 0 (the default) never."""
    return _int4_gemm_max_tokens


def set_int4_gemm_max_tokens(tokens: int) -> None:
    """Route up to ``tokens`` tokens to the fused dequantize-GEMM (0 switches it off)."""
    global _int4_gemm_max_tokens
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        raise ValueError(f"int4 gemm max tokens must be an int >= 0 (0: off), got {tokens!r}")
    _int4_gemm_max_tokens = tokens
