"""Every name this package takes from the inside of its dependencies, in one place.

These are private (underscore) names or modules that are not part of a documented public API. They were checked
against the versions in :data:`CHECKED_VERSIONS`; when a dependency moves one, this is the only file to change.
bitsandbytes is optional: its name is imported when first used.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import _get_in_out_features
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.base import HfQuantizer, _assign_is_quantized
from transformers.quantizers.quantizers_utils import get_module_from_name

__all__ = [
    "CHECKED_VERSIONS",
    "BufferDict",
    "ConversionOps",
    "HfQuantizer",
    "assign_is_quantized",
    "dynamo_checkpoint_side_effects_allowed",
    "get_in_out_features",
    "get_module_from_name",
    "peft_method_mappings",
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
