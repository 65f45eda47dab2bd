"""GradApprox: LoRA-shaped adapters initialised from a streamed sketch of the full fine-tuning gradient."""

from ...integration import register_method
from .approximator import GradientApproximation, GradientApproximator
from .callback import GradApproxInitCallback
from .config import GradApproxConfig
from .estimate import GradApproxInitReport, init_gradapprox
from .layer import GradApproxLayer, GradApproxLinear
from .model import GradApproxModel
from .trainer import GradApproxTrainer, GradApproxTrainerMixin, with_gradient_approximator

register_method(GradApproxConfig, GradApproxModel)

__all__ = [
    "GradApproxConfig",
    "GradApproxInitCallback",
    "GradApproxInitReport",
    "GradApproxLayer",
    "GradApproxLinear",
    "GradApproxModel",
    "GradApproxTrainer",
    "GradApproxTrainerMixin",
    "GradientApproximation",
    "GradientApproximator",
    "init_gradapprox",
    "with_gradient_approximator",
]
