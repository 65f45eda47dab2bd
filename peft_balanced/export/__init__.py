"""Exporters of quantized models to other runtimes' file formats (today: GGUF for llama.cpp)."""

from .gguf import export_gguf

__all__ = ["export_gguf"]
