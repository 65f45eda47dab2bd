"""GradApprox: LoRA-shaped adapters initialised from a streamed sketch of the full fine-tuning gradient."""

from .callback import GradApproxInitCallback
from .config import GradApproxConfig
from .estimate import GradApproxInitReport, init_gradapprox
from .layer import GradApproxLayer, GradApproxLinear
from .model import GradApproxModel

__all__ = [
    "GradApproxConfig",
    "GradApproxInitCallback",
    "GradApproxInitReport",
    "GradApproxLayer",
    "GradApproxLinear",
    "GradApproxModel",
    "init_gradapprox",
]
