"""2-D-tile INT4 quantization: one scale and zero point per ``l1 x l2`` tile, hosting QA-BLoRA merges.

* :mod:`.tile_int4`: the format (quantize / dequantize / pack), pure torch.
* :mod:`.spec`: :class:`TileInt4Spec`, the one description of a quantization every layer below takes.
* :mod:`.linear`: :class:`TileInt4Linear`, the frozen module.
* :mod:`.select` and :mod:`.quantize`: which linears of a model are quantized, and :func:`quantize_model`.
* :mod:`.hf`: the transformers adapter (``TileInt4Config``, the ``"tile_int4"`` quantizer).
* :mod:`.kernels`: Triton kernels (tile-INT4 dequantize, GEMV and small GEMM, and the route between them; NF4
  dequantize). Every tile-INT4 kernel reads one :class:`TileInt4Weight` (codes, scale, zero, tile).

Imports only go down that list (``hf`` -> ``linear`` -> ``tile_int4``; ``quantize`` -> ``hf``), never back. ``import
peft_balanced`` registers the ``"tile_int4"`` quantization method with transformers (:mod:`peft_balanced.integration`), so
``from_pretrained(path, quantization_config=TileInt4Config(...))`` quantizes on load and a saved quantized model
reloads with a plain ``from_pretrained(path)``. GGUF export lives in :mod:`peft_balanced.export.gguf`.
"""

from .hf import TileInt4Config, TileInt4HfQuantizer
from .linear import TileInt4Linear
from .quantize import quantize_model
from .select import iter_quantizable_linears
from .spec import TileInt4Spec
from .tile_int4 import TileInt4Weight, dequantize_tiles, pack_int4, quantize_tiles, unpack_int4

__all__ = [
    "TileInt4Config",
    "TileInt4HfQuantizer",
    "TileInt4Linear",
    "TileInt4Spec",
    "TileInt4Weight",
    "dequantize_tiles",
    "iter_quantizable_linears",
    "pack_int4",
    "quantize_model",
    "quantize_tiles",
    "unpack_int4",
]
