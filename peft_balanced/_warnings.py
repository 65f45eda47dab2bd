"""Scoped filters for notices that upstream libraries raise about themselves (imports nothing heavy)."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import sys
import warnings
from collections.abc import Iterator

# the loggers through which bitsandbytes' hub-kernel attempt speaks: its CPU backend, and the kernels package
HUB_KERNEL_LOGGERS = ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub")
HUB_KERNEL_REPOSITORY = "kernels-community/"


class _DropMessagesMentioning(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def import_bitsandbytes_quietly() -> None:
    """Import bitsandbytes (if installed and not yet imported) without its hub-kernel notice on CPU.

    On a CPU with AVX512-BF16, bitsandbytes >= 0.49 tries at import to fetch an optional CPU GEMM kernel from the
    Hugging Face Hub through the ``kernels`` package (which transformers >= 5.25 installs). Without network, or
    without trusting that repository's code, it logs "Failed to load CPU gemm_4bit_forward from
    kernels-community ..." (offline, ``kernels`` first logs that it skips the publisher check) and uses its own CPU
    kernels: nothing is lost, and a user cannot act on it short of trusting remote code. peft imports bitsandbytes
    on ``import peft``, so this runs first and, while bitsandbytes is imported, drops exactly the records that name
    the hub's kernel repository; every other message still shows.
    """
    if "bitsandbytes" in sys.modules or importlib.util.find_spec("bitsandbytes") is None:
        return
    loggers = [logging.getLogger(name) for name in HUB_KERNEL_LOGGERS]
    notice_filter = _DropMessagesMentioning(HUB_KERNEL_REPOSITORY)
    for logger in loggers:
        logger.addFilter(notice_filter)
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # a broken bitsandbytes install fails later, where it is used, with its own error
        pass
    finally:
        for logger in loggers:
            logger.removeFilter(notice_filter)


@contextlib.contextmanager
def quiet_peft_checkpointing_alias() -> Iterator[None]:
    """Silence transformers' ``is_gradient_checkpointing`` deprecation notice raised by peft's own code.

    peft (0.21) reads ``model.is_gradient_checkpointing`` in ``PeftModel.__init__``; transformers >= 5.23 made that
    a deprecated alias of ``is_activation_checkpointing``. Users cannot act on it, so the commands of this package
    hide exactly that message while building a ``PeftModel``; every other warning still shows.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield
