"""QA-BLoRA: the quantization-aware balanced adapter, merged into a 2-D-tile INT4 base without leaving 4 bits."""

from ...integration import register_method
from .config import QABLoRAConfig
from .layer import QABLoRALayer, QABLoRALinear, check_qablora_base
from .model import QABLoRAModel

register_method(QABLoRAConfig, QABLoRAModel)

__all__ = ["QABLoRAConfig", "QABLoRALayer", "QABLoRALinear", "QABLoRAModel", "check_qablora_base"]
