"""peft-balanced: balanced low-rank adapters as PEFT plugins.

``import peft_balanced`` registers the PEFT types ``BLORA`` (and reserves ``QABLORA`` / ``GRADAPPROX``) with peft,
so that ``get_peft_model``, ``PeftModel.from_pretrained``, ``AutoPeftModelForCausalLM`` and TRL's ``SFTTrainer``
treat them like LoRA. Importing twice, or reloading, is harmless.
"""

from .registry import register, reserve_owned_types
from .tuners.blora import BLoRAConfig, BLoRALayer, BLoRALinear, BLoRAModel

__version__ = "0.1.0"

reserve_owned_types()
register("BLORA", config_cls=BLoRAConfig, model_cls=BLoRAModel, prefix=BLoRAModel.prefix)

__all__ = ["BLoRAConfig", "BLoRALayer", "BLoRALinear", "BLoRAModel", "__version__"]

from .tuners.gradapprox import GradApproxConfig, GradApproxInitCallback, GradApproxModel, init_gradapprox  # noqa: E402

register("GRADAPPROX", config_cls=GradApproxConfig, model_cls=GradApproxModel, prefix=GradApproxModel.prefix)
__all__ += ["GradApproxConfig", "GradApproxInitCallback", "GradApproxModel", "init_gradapprox"]

from .tuners.qablora import QABLoRAConfig, QABLoRAModel  # noqa: E402

register("QABLORA", config_cls=QABLoRAConfig, model_cls=QABLoRAModel, prefix=QABLoRAModel.prefix)
__all__ += ["QABLoRAConfig", "QABLoRAModel"]
