"""GGUF export of tile-INT4 Llama models: lossless Q4_1 weights (:mod:`.writer`) and the tokenizer (:mod:`.vocab`)."""

from .vocab import infer_pre_tokenizer, write_tokenizer
from .writer import export_gguf, llama_qk_row_order, tile_int4_to_q4_1

__all__ = ["export_gguf", "infer_pre_tokenizer", "llama_qk_row_order", "tile_int4_to_q4_1", "write_tokenizer"]
