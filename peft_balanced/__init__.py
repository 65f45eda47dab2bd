"""peft-balanced: balanced low-rank adapters as PEFT plugins.

``import peft_balanced`` registers the PEFT types ``BLORA`` (BLoRA / Q-BLoRA), ``QABLORA`` (QA-BLoRA on the
2-D-tile INT4 format) and ``GRADAPPROX`` (gradient-subspace initialization) with peft, so that ``get_peft_model``,
``PeftModel.from_pretrained``, ``AutoPeftModelForCausalLM`` and TRL's ``SFTTrainer`` treat them like LoRA, and the
``"tile_int4"`` quantization method with transformers. Importing twice, or reloading, is harmless.
"""
# ruff: noqa: E402  (bitsandbytes is imported quietly before anything imports peft, which imports it)

from ._warnings import import_bitsandbytes_quietly

import_bitsandbytes_quietly()

from .checkpoint import install_checkpoint_guards
from .compilation import compile_for_training
from .demo.models import load_default_model
from .export import export_gguf
from .quant import TileInt4Config, TileInt4Linear, TileInt4Spec, quantize_model
from .registry import count_packed_weights, register, reserve_owned_types
from .settings import KernelPreference, get_kernel_preference, kernel_preference, set_kernel_preference
from .tuners.blora import BLoRAConfig, BLoRALayer, BLoRALinear, BLoRAModel
from .tuners.gradapprox import (
    GradApproxConfig,
    GradApproxInitCallback,
    GradApproxModel,
    GradApproxTrainer,
    GradientApproximation,
    init_gradapprox,
    with_gradient_approximator,
)
from .tuners.qablora import QABLoRAConfig, QABLoRAModel

__version__ = "0.1.0"

reserve_owned_types()
count_packed_weights()
install_checkpoint_guards()
register("BLORA", config_cls=BLoRAConfig, model_cls=BLoRAModel, prefix=BLoRAModel.prefix)
register("QABLORA", config_cls=QABLoRAConfig, model_cls=QABLoRAModel, prefix=QABLoRAModel.prefix)
register("GRADAPPROX", config_cls=GradApproxConfig, model_cls=GradApproxModel, prefix=GradApproxModel.prefix)


__all__ = [
    "BLoRAConfig",
    "BLoRALayer",
    "BLoRALinear",
    "BLoRAModel",
    "GradApproxConfig",
    "GradApproxInitCallback",
    "GradApproxModel",
    "GradApproxTrainer",
    "GradientApproximation",
    "KernelPreference",
    "QABLoRAConfig",
    "QABLoRAModel",
    "TileInt4Config",
    "TileInt4Linear",
    "TileInt4Spec",
    "__version__",
    "compile_for_training",
    "export_gguf",
    "get_kernel_preference",
    "init_gradapprox",
    "kernel_preference",
    "load_default_model",
    "quantize_model",
    "set_kernel_preference",
    "with_gradient_approximator",
]
