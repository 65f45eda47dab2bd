"""The PEFT tuners of peft-balanced, one sub-package per method (config.py / layer.py / model.py)."""
