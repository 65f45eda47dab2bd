"""Old location of :mod:`peft_balanced.demo.models`: the same module object (so patching one patches the other)."""

import sys

from .demo import models as _module

sys.modules[__name__] = _module
