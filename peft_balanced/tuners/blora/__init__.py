"""BLoRA / Q-BLoRA: the balanced low-rank adapter."""

from .config import BLoRAConfig
from .layer import BLoRALayer, BLoRALinear
from .model import BLoRAModel

__all__ = ["BLoRAConfig", "BLoRALayer", "BLoRALinear", "BLoRAModel"]
