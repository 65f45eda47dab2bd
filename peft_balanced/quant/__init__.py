"""2-D-tile INT4 quantization: one scale and zero point per ``l1 x l2`` tile, hosting QA-BLoRA merges.

Importing this package registers the ``"tile_int4"`` quantization method with transformers (idempotent), so
``from_pretrained(path, quantization_config=TileInt4Config(...))`` quantizes on load and a saved quantized model
reloads with a plain ``from_pretrained(path)``.
"""

from .export import export_gguf
from .hf import TileInt4Config, TileInt4HfQuantizer, register
from .linear import TileInt4Linear, quantize_model
from .tile_int4 import dequantize_tiles, pack_int4, quantize_tiles, unpack_int4

register()

__all__ = [
    "TileInt4Config",
    "TileInt4HfQuantizer",
    "TileInt4Linear",
    "dequantize_tiles",
    "export_gguf",
    "pack_int4",
    "quantize_model",
    "quantize_tiles",
    "unpack_int4",
]
