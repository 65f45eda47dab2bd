"""Experimental API: the learned gradient approximator of GradApprox.

This module is the one public home of the approximator's names; they are not exported by the package root
(``peft_balanced``), whose ``__all__`` is the stable library. The approximator is off by default
(``GradApproxConfig(approximator_depth=0)``) because it has not been shown to pay off (``docs/benchmarks.md``); its
names may change or go without a deprecation period.

* :class:`GradientApproximation` (and its network :class:`GradientApproximator`): run it in a plain training loop.
* :func:`with_gradient_approximator` (``with_gradient_approximator(SFTTrainer)``), :class:`GradApproxTrainer` (a
  ``transformers.Trainer``) and :class:`GradApproxTrainerMixin`: the same inside a ``Trainer``.

The code lives in :mod:`peft_balanced.tuners.gradapprox.approximator` and
:mod:`peft_balanced.tuners.gradapprox.trainer`.

    from peft_balanced.experimental import with_gradient_approximator
"""

from .tuners.gradapprox.approximator import GradientApproximation, GradientApproximator
from .tuners.gradapprox.trainer import GradApproxTrainer, GradApproxTrainerMixin, with_gradient_approximator

__all__ = [
    "GradApproxTrainer",
    "GradApproxTrainerMixin",
    "GradientApproximation",
    "GradientApproximator",
    "with_gradient_approximator",
]
