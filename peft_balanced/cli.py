"""Old location of :mod:`peft_balanced.demo.cli`: the same module object (so patching one patches the other)."""

import sys

from .demo import cli as _module

sys.modules[__name__] = _module
