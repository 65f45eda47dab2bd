"""Run-time settings of the package: which kernels the quantized layers use.

One named setting replaces the environment flags that modules used to read on their own (torchao's
``KernelPreference`` in spirit)::

    peft_balanced.set_kernel_preference("torch")          # from now on
    with peft_balanced.kernel_preference("bitsandbytes"):  # for a block
        ...

While nothing is set, the old environment flags are read here, and only here, as aliases:
``PEFT_BALANCED_DISABLE_TRITON=1`` means ``"torch"`` and ``PEFT_BALANCED_DISABLE_FAST_NF4=1`` means
``"bitsandbytes"``.

One more decides whether tile-INT4 layers time their kernels on first use for each layer shape and token count
(``set_int4_autotune``, default on; ``quant/kernels/route.py``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum

from .validation import check_enum, check_flag

__all__ = [
    "KernelPreference",
    "get_kernel_preference",
    "int4_autotune_allowed",
    "kernel_preference",
    "set_int4_autotune",
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


_int4_autotune = True


def int4_autotune_allowed() -> bool:
    """Whether a ``TileInt4Linear`` call on CUDA may time its kernels for a new layer shape and token count (see
    ``quant/kernels/route.py``); default ``True``."""
    return _int4_autotune


def set_int4_autotune(enabled: bool) -> None:
    """Let tile-INT4 layers measure their kernels on first use (``True``, the default) or always take the default
    route (``False``)."""
    global _int4_autotune
    _int4_autotune = check_flag("int4 autotune", enabled)
