"""peft-balanced: balanced low-rank adapters as PEFT plugins.

``import peft_balanced`` registers the PEFT types ``BLORA`` (BLoRA / Q-BLoRA), ``QABLORA`` (QA-BLoRA on the
2-D-tile INT4 format) and ``GRADAPPROX`` (gradient-subspace initialization) with peft, so that ``get_peft_model``,
``PeftModel.from_pretrained``, ``AutoPeftModelForCausalLM`` and TRL's ``SFTTrainer`` treat them like LoRA, and the
``"tile_int4"`` quantization method with transformers. Importing twice, or reloading, is harmless. Every change
this makes to peft and transformers is listed, with why, in :mod:`peft_balanced.integration`.

``__all__`` is the library. The experimental learned gradient approximator of GradApprox (``GradientApproximation``,
``with_gradient_approximator``, ``GradApproxTrainer``) is imported from :mod:`peft_balanced.experimental`; the demo's
helpers (``peft_balanced.demo.models.load_default_model``, ...) from :mod:`peft_balanced.demo`, and the
``peft-balanced`` command is :mod:`peft_balanced.cli`: importing the package loads neither.
"""
# ruff: noqa: E402  (_compat imports bitsandbytes quietly before anything imports peft, which imports it)

from . import (
    _compat,  # noqa: F401  (first)
    integration,
)

integration.install()

from .compilation import compile_for_training
from .export import export_gguf
from .probe import BalanceProbe, probe_balance
from .quant import TileInt4Config, TileInt4Linear, TileInt4Spec, quantize_model
from .settings import KernelPreference, get_kernel_preference, kernel_preference, set_kernel_preference
from .tuners.blora import BLoRAConfig, BLoRALayer, BLoRALinear, BLoRAModel
from .tuners.gradapprox import (
    GradApproxConfig,
    GradApproxInitCallback,
    GradApproxModel,
    init_gradapprox,
)
from .tuners.qablora import QABLoRAConfig, QABLoRAModel

__version__ = "0.1.0"


__all__ = [
    "BLoRAConfig",
    "BalanceProbe",
    "BLoRALayer",
    "BLoRALinear",
    "BLoRAModel",
    "GradApproxConfig",
    "GradApproxInitCallback",
    "GradApproxModel",
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
    "probe_balance",
    "quantize_model",
    "set_kernel_preference",
]
