"""BLoRA / Q-BLoRA: the balanced low-rank adapter."""

from ...integration import register_method
from .config import BLoRAConfig
from .layer import BLoRALayer, BLoRALinear
from .model import BLoRAModel

register_method(BLoRAConfig, BLoRAModel)

__all__ = ["BLoRAConfig", "BLoRALayer", "BLoRALinear", "BLoRAModel"]
