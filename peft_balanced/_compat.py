"""Every name this package takes from the inside of its dependencies, in one place.

These are private (underscore) names or modules that are not part of a documented public API. They were checked
against the versions in :data:`CHECKED_VERSIONS`; when a dependency moves one, this is the only file to change.
bitsandbytes is optional: its name is imported when first used.

It also holds the scoped filters for notices that dependencies raise about themselves, which a user cannot act on.
Importing this module first imports bitsandbytes with its hub-kernel notice filtered (peft imports bitsandbytes on
``import peft``, so that must happen before the first import of peft below).
"""
# ruff: noqa: E402  (bitsandbytes is imported quietly before peft, which imports it)

from __future__ import annotations

import contextlib
import importlib.util
import logging
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any

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


import_bitsandbytes_quietly()


from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import _get_in_out_features
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.base import HfQuantizer, _assign_is_quantized
from transformers.quantizers.quantizers_utils import get_module_from_name

__all__ = [
    "CHECKED_VERSIONS",
    "HUB_KERNEL_LOGGERS",
    "BufferDict",
    "ConversionOps",
    "HfQuantizer",
    "assign_is_quantized",
    "dynamo_checkpoint_side_effects_allowed",
    "get_in_out_features",
    "get_module_from_name",
    "import_bitsandbytes_quietly",
    "peft_method_mappings",
    "quiet_peft_checkpointing_alias",
    "set_peft_weights_writer",
    "unpack_bnb_cpu_weight",
]

CHECKED_VERSIONS = {"peft": "0.21.2", "transformers": "5.25.0", "bitsandbytes": "0.50.2", "torch": "2.13.0"}

get_in_out_features = _get_in_out_features  # peft: (in_features, out_features) of a (quantized) base layer
assign_is_quantized = _assign_is_quantized  # transformers: mark every module of a model as quantized


def unpack_bnb_cpu_weight(data: Any, quant_state: Any) -> tuple[Any, Any]:
    """bitsandbytes: undo the AVX512-BF16 CPU repack of a 4-bit weight; returns ``(data, quant_state)``."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    return _convert_weight_packed_for_cpu_inverse(data, quant_state)


def dynamo_checkpoint_side_effects_allowed(function: Callable) -> Callable:
    """torch: ``function`` traced with dynamo allowing side effects inside ``torch.utils.checkpoint`` regions.

    transformers >= 5.25 runs the checkpoint inside a decoder layer's ``forward``, and its hub-kernel layers set a
    context variable there; dynamo refuses such a side effect inside the checkpoint unless this (private) setting
    is on, and without it a compiled layer falls back to eager. Older torch lacks the setting: ``function`` as is.
    """
    import torch._dynamo

    if not hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        return function
    return torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True)(function)


def peft_method_mappings() -> tuple[dict, dict, dict]:
    """peft's registries of methods: ``(config, tuner, prefix)`` mappings keyed by ``PeftType``."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    return PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING


def set_peft_weights_writer(save_file: Any) -> None:
    """peft: replace the ``safetensors`` ``save_file`` through which ``PeftModel.save_pretrained`` writes weights."""
    import peft.peft_model

    peft.peft_model.safe_save_file = save_file
