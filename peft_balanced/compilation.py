"""Opt-in ``torch.compile`` of a model for training, one decoder layer at a time (regional compilation).

Compiling each repeated decoder layer instead of the whole model keeps compile time to one layer's (the layers
share one compiled graph: same code, same shapes) and leaves the embedding, the loss and peft's wrappers eager.
The package's own nodes compile whole: dynamo traces the fused balanced-adapter add (an ``autograd.Function``,
forward and backward), so inductor fuses it with its neighbours; the quantized layers' dequantize kernels (NF4,
tile-INT4) are ``torch.library.triton_op``s that inductor launches from its own code, and whether Triton is usable is
decided outside the trace. So a decoder layer with BLoRA, Q-BLoRA or QA-BLoRA adapters compiles without graph breaks.
Measured speed: docs/benchmarks.md ("compile_for_training").

Limits:

* Gradient checkpointing: transformers wraps each decoder layer in ``torch.utils.checkpoint`` (up to 5.24 around
  the layer's call, so the compiled layer runs inside it; from 5.25 inside the layer's ``forward``, so the compiled
  graph holds the checkpoint and the recomputation). Enable it before or after, with ``use_reentrant=False``. Side
  effects inside a checkpointed layer (transformers' hub-kernel and output-capture context variables) are not
  replayed in the recomputation; they only select kernels and record outputs of the first forward.
* ``fullgraph=True`` (the default): a layer that dynamo cannot compile whole raises at its first call (with
  dynamo's reason) instead of silently running eager in parts. Our adapters compile whole; peft's bitsandbytes
  layers (QLoRA) do not: pass ``fullgraph=False`` for those, and the layer compiles between its graph breaks.
* ``mode="reduce-overhead"`` uses CUDA graphs: shapes must be static (pad or pack every batch to one length;
  ``dynamic=False``), and a new shape records a new graph. On CPU it is the same as ``"default"``.
* Changing the model's structure afterwards (adding, deleting or merging adapters, switching the active adapter)
  triggers a recompile on the next call; merging in place is fine, a new layer object is not seen.
* Numerics: inductor fuses and reorders float32 operations, so float32 results are close to, not bit-identical
  with, eager's; with ``emulate_precision_casts`` (the default) bf16 results follow eager's roundings (bit for bit
  in our tests on CUDA, and on the CPU from torch 2.13: older CPU inductors ignore the option).
* Every compiled model adds guards to the one compiled decoder-layer code; more than
  ``torch._dynamo.config.recompile_limit`` (8) differently built models in one process cannot be compiled: with
  ``fullgraph=True`` that raises; raise the limit (``benchmarks/speed/speed.py`` does) or call
  ``torch._dynamo.reset()`` between models.
"""

from __future__ import annotations

from torch import nn

from ._compat import dynamo_checkpoint_side_effects_allowed

__all__ = ["COMPILE_MODES", "compile_for_training", "decoder_layers"]

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _base_model(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)  # a PeftModel
    return get_base() if callable(get_base) else model


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated decoder layers of a transformers model (also inside a ``PeftModel``).

    The layer classes are the model's ``_no_split_modules`` (transformers' own list of blocks never split across
    devices); without it, the children of the longest ``nn.ModuleList`` whose entries all have one class.
    """
    base = _base_model(model)
    names = set(getattr(base, "_no_split_modules", None) or ())
    layers = [module for module in base.modules() if type(module).__name__ in names]
    if layers:
        return layers
    lists = [m for m in base.modules() if isinstance(m, nn.ModuleList) and len(m) and len({type(c) for c in m}) == 1]
    return list(max(lists, key=len)) if lists else []


def compile_for_training(
    model: nn.Module,
    mode: str = "default",
    dynamic: bool | None = None,
    emulate_precision_casts: bool = True,
    fullgraph: bool = True,
) -> nn.Module:
    """Compile every decoder layer of ``model`` in place with ``layer.compile(...)`` in ``mode``.

    ``model``: a transformers model or a ``PeftModel`` around one (adapters already added). Returns ``model``.
    ``mode``: a ``torch.compile`` mode (``"default"``, ``"reduce-overhead"``: CUDA graphs, static shapes).
    ``dynamic``: ``torch.compile``'s (``None``: static first, dynamic after a shape changes; ``False`` for
    ``"reduce-overhead"`` with fixed-length batches). ``emulate_precision_casts``: inductor rounds every
    intermediate to its eager dtype (bf16 / fp16) instead of keeping it in float32 inside a fused kernel, so
    low-precision results follow eager's roundings (bf16 training matched eager bit for bit in our tests on CUDA,
    and on the CPU from torch 2.13); ``False`` may be faster. ``fullgraph``: raise when a layer cannot be compiled
    as one graph (``False``: compile between graph breaks). See this module's docstring for the limits.
    """
    if mode not in COMPILE_MODES:
        raise ValueError(
            f"compile_for_training: mode must be one of {', '.join(map(repr, COMPILE_MODES))}, got {mode!r}"
        )
    if dynamic not in (None, True, False):
        raise ValueError(f"compile_for_training: dynamic must be None, True or False, got {dynamic!r}")
    if not isinstance(fullgraph, bool):
        raise ValueError(f"compile_for_training: fullgraph must be True or False, got {fullgraph!r}")
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(
            f"compile_for_training: found no repeated decoder layers in {type(_base_model(model)).__name__} (neither "
            "its _no_split_modules classes nor an nn.ModuleList of one class); compile the model yourself with "
            "torch.compile(model)."
        )
    from torch._inductor import list_mode_options

    options = {**list_mode_options(mode, dynamic), "emulate_precision_casts": bool(emulate_precision_casts)}
    for layer in layers:
        layer.compile(dynamic=dynamic, fullgraph=fullgraph, options=options)
        # nn.Module.compile keeps the compiled call here; tracing it must allow the checkpoint's side effects
        layer._compiled_call_impl = dynamo_checkpoint_side_effects_allowed(layer._compiled_call_impl)
    return model
