"""Old location of :mod:`peft_balanced.demo.data`: the same module object (so patching one patches the other)."""

import sys

from .demo import data as _module

sys.modules[__name__] = _module
