"""``python -m peft_balanced.cli``: the ``peft-balanced`` command."""

import sys

from . import main

sys.exit(main())
