"""Export a TileInt4 Llama model (e.g. a merged QA-BLoRA model) to a GGUF file with lossless Q4_1 weights.

GGUF's Q4_1 stores a row's weights in blocks of 32 consecutive inputs with an fp16 scale ``d`` and an fp16 minimum
``m``: ``w = d * q + m``, ``q in 0..15`` — the asymmetric min-max form of our tiles. A ``TileInt4Linear`` whose tile
is ``(32 * k, 1)`` maps block for block (its alpha/beta repeated over the ``k`` blocks of a tile), bit-exactly when
alpha and beta hold float16 values. Nothing is ever re-quantized: a layer that does not fit raises an error.

Block layout (checked against ``gguf.quants.Q4_1``): 20 bytes = ``d`` (fp16, little-endian), ``m`` (fp16), then 16
bytes whose byte ``k`` holds ``q[k]`` in its low nibble and ``q[k + 16]`` in its high nibble.

Other tensors are written in the float type that holds them exactly: float32 -> F32, float16 -> F16, bfloat16 ->
BF16; norm weights are always F32 (llama.cpp's convention for 1-D tensors). A float32 model (the CPU default) so
gets F32 embeddings / ``lm_head``: larger than F16, but the round trip is lossless.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ...checkpoint import atomic_write
from ...quant.linear import TileInt4Linear
from ...quant.tile_int4 import dtype_name, unpack_int4
from .vocab import write_tokenizer

__all__ = ["Q4_1_BLOCK", "export_gguf", "llama_qk_row_order", "tile_int4_to_q4_1"]

Q4_1_BLOCK = 32  # inputs per Q4_1 block
Q4_1_BLOCK_BYTES = 20  # fp16 d + fp16 m + 16 bytes of nibbles

_INSTALL_HINT = "GGUF export needs the `gguf` package: `pip install 'peft-balanced[gguf]'` (or `pip install gguf`)."


def _import_gguf() -> Any:
    try:
        import gguf
    except ImportError as err:
        raise ImportError(_INSTALL_HINT) from err
    return gguf


# ---------------------------------------------------------------------------------------------------- Q4_1 packing


def _check_fp16_exact(tensor: torch.Tensor, label: str, name: str) -> None:
    """Raise unless every value of ``tensor`` survives a round trip through float16 unchanged."""
    values = tensor.detach().float()
    half = values.to(torch.float16).float()
    bad = ~(half == values) | ~torch.isfinite(values)
    if bool(bad.any()):
        raise ValueError(
            f"cannot export module {name!r} as GGUF Q4_1 losslessly: its {label} is {dtype_name(tensor.dtype)} and "
            f"{int(bad.sum())} of {bad.numel()} values are not exactly representable in float16 (Q4_1 stores an fp16 "
            f"scale d and minimum m). Quantize with scale_dtype='float16' and zero_dtype='float16' (e.g. "
            f"quantize_model(model, tile=(32, 1), scale_dtype='float16', zero_dtype='float16')); QA-BLoRA merges then "
            f"round beta to float16 (see benchmarks/studies/qablora_merge_error.py). Nothing is re-quantized "
            f"silently."
        )


def check_q4_1_compatible(module: TileInt4Linear, name: str) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``module`` maps losslessly onto Q4_1 blocks.

    Valid: tile ``(32 * k, 1)`` (a tile spans whole 32-input blocks of one output row), no bias, and alpha/beta
    whose values are exactly representable in float16.
    """
    l1, l2 = module.tile
    if l2 != 1 or l1 % Q4_1_BLOCK:
        raise ValueError(
            f"cannot export module {name!r} as GGUF Q4_1: it is quantized with tile={tuple(module.tile)} "
            f"(l1={l1} inputs x l2={l2} outputs), but a Q4_1 block is {Q4_1_BLOCK} inputs x 1 output, so the tile "
            "must be (32*k, 1): (32, 1), (64, 1), (96, 1), ... Quantize with e.g. quantize_model(model, tile=(32, 1), "
            "scale_dtype='float16', zero_dtype='float16') (and QABLoRAConfig(tile=(32, 1)))."
        )
    if module.bias is not None:
        raise ValueError(f"cannot export module {name!r}: it has a bias, which Llama GGUF projections do not have")
    _check_fp16_exact(module.scale, "scale (alpha)", name)
    _check_fp16_exact(module.zero, "zero (beta)", name)


def _le_fp16_bytes(values: torch.Tensor) -> np.ndarray:
    """``(...,)`` float values (exact in fp16) -> ``uint8 (..., 2)``, little-endian fp16 bytes."""
    return values.detach().cpu().to(torch.float16).numpy().astype("<f2").view(np.uint8).reshape(*values.shape, 2)


def tile_int4_to_q4_1(module: TileInt4Linear, name: str = "") -> np.ndarray:
    """The Q4_1 bytes of a compatible ``TileInt4Linear``: ``uint8 (D_out, D_in // 32 * 20)``, row-major like GGUF.

    Dequantizing them (``gguf.quants.dequantize``) gives exactly ``module.dequantize(torch.float32)``.
    """
    check_q4_1_compatible(module, name)
    d_out, d_in = module.out_features, module.in_features
    n_blocks = d_in // Q4_1_BLOCK
    per_tile = module.tile[0] // Q4_1_BLOCK
    codes = unpack_int4(module.qweight.detach().cpu()).reshape(d_out, n_blocks, Q4_1_BLOCK).numpy()
    nibbles = codes[..., : Q4_1_BLOCK // 2] | (codes[..., Q4_1_BLOCK // 2 :] << 4)  # (D_out, n_blocks, 16)
    d = _le_fp16_bytes(module.scale.repeat_interleave(per_tile, dim=1))  # (D_out, n_blocks, 2)
    m = _le_fp16_bytes(module.zero.repeat_interleave(per_tile, dim=1))
    blocks = np.concatenate([d, m, nibbles.astype(np.uint8)], axis=-1)
    return np.ascontiguousarray(blocks.reshape(d_out, n_blocks * Q4_1_BLOCK_BYTES))


def llama_qk_row_order(rows: int, n_head: int) -> torch.Tensor:
    """Row order llama.cpp's converter gives a Llama q/k projection: ``gguf_rows = hf_rows[order]``.

    Within each head the two rotary halves are interleaved (``(n_head, 2, d/2) -> (n_head, d/2, 2)``);
    transformers' GGUF loader undoes it. It moves whole rows, so Q4_1 blocks stay intact.
    """
    if rows % (2 * n_head):
        raise ValueError(f"a q/k projection with {rows} rows cannot be split into {n_head} heads of even size")
    return torch.arange(rows).reshape(n_head, 2, rows // n_head // 2).transpose(1, 2).reshape(-1)


# ---------------------------------------------------------------------------------------------------- tensors


_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _float_tensor(gguf: Any, tensor: torch.Tensor, name: str, force_f32: bool = False) -> tuple[np.ndarray, Any]:
    """A float tensor as ``(array, ggml type)`` in the GGUF float type holding it exactly."""
    tensor = tensor.detach().cpu()
    if tensor.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"cannot export {name!r}: dtype {tensor.dtype} (valid: float32, float16, bfloat16)")
    if force_f32 or tensor.dtype == torch.float32:
        return tensor.float().numpy().astype("<f4"), gguf.GGMLQuantizationType.F32
    if tensor.dtype == torch.float16:
        return tensor.numpy().astype("<f2"), gguf.GGMLQuantizationType.F16
    return tensor.view(torch.int16).numpy().astype("<i2").view(np.uint16), gguf.GGMLQuantizationType.BF16


def _unwrap(model: nn.Module) -> nn.Module:
    """Reject models with adapters still attached; return the transformers model."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    attached = [name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    if attached:
        raise ValueError(
            f"cannot export a model with adapter layers still attached ({attached[0]!r} and {len(attached) - 1} "
            "more): merge them first, e.g. `model = peft_model.merge_and_unload()` (QA-BLoRA merges stay 4-bit)"
        )
    return model


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"cannot export a Llama model with rope_type={rope_type!r}: only 'default' RoPE is written")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ValueError("cannot export: the model config has no rope_theta")
    return float(theta)


def _check_llama(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) != "llama" or not hasattr(model, "lm_head"):
        raise ValueError(
            f"export_gguf writes Llama-architecture causal LMs (LlamaForCausalLM, e.g. SmolLM2), got "
            f"{type(model).__name__} (model_type={getattr(config, 'model_type', None)!r})"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise ValueError(f"cannot export a Llama model with {flag}=True (not written by this exporter)")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ValueError(f"cannot export a Llama model with hidden_act={config.hidden_act!r} (GGUF Llama is silu)")
    return config


def _llama_tensors(gguf: Any, model: nn.Module, config: Any) -> tuple[list[tuple[str, np.ndarray, Any]], bool]:
    """``[(gguf name, array, ggml type)]`` for every weight of ``model``, and whether any is Q4_1.

    Raises if a tensor of the model has no GGUF counterpart (it would be silently dropped otherwise).
    """
    n_layers = config.num_hidden_layers
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    head_counts = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    out, covered, any_q4_1 = [], set(), False
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        own = {prefix + k for k, v in module._parameters.items() if v is not None}
        own |= {
            prefix + k
            for k, v in module._buffers.items()
            if v is not None and k not in module._non_persistent_buffers_set
        }
        if not own:
            continue
        covered |= own
        if module_name == "lm_head" and tied:
            continue
        base = names.get_name(module_name)
        if base is None:
            raise ValueError(f"cannot export {module_name!r} ({type(module).__name__}): it has no GGUF Llama tensor")
        order = None
        leaf = module_name.rpartition(".")[2]
        if leaf in head_counts:
            order = llama_qk_row_order(module.out_features, head_counts[leaf])
        if isinstance(module, TileInt4Linear):
            data = tile_int4_to_q4_1(module, module_name)
            ggml_type, any_q4_1 = gguf.GGMLQuantizationType.Q4_1, True
        elif isinstance(module, nn.Linear | nn.Embedding) or module.weight.dim() == 1:
            if getattr(module, "bias", None) is not None:
                raise ValueError(f"cannot export {module_name!r}: it has a bias, which GGUF Llama does not have")
            data, ggml_type = _float_tensor(gguf, module.weight, module_name, force_f32=module.weight.dim() == 1)
        else:
            raise ValueError(f"cannot export {module_name!r}: unsupported module type {type(module).__name__}")
        if order is not None:
            data = np.ascontiguousarray(data[order.numpy()])
        out.append((f"{base}.weight", data, ggml_type))
    missing = set(model.state_dict()) - covered
    if missing:
        raise ValueError(f"cannot export: tensors {sorted(missing)[:3]} were not mapped to GGUF tensors")
    return out, any_q4_1


def _write_llama_config(writer: Any, config: Any) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)


# ---------------------------------------------------------------------------------------------------- file


def export_gguf(
    model: nn.Module,
    tokenizer: Any,
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    name: str | None = None,
    pre_tokenizer: str | None = None,
    allow_float: bool = False,
) -> Path:
    """Write ``model`` (a Llama ``*ForCausalLM`` with ``TileInt4Linear`` projections) to the GGUF file ``path``.

    ``TileInt4Linear`` layers become Q4_1 tensors bit-exactly; they need tile ``(32 * k, 1)`` and float16-exact
    alpha/beta, otherwise a ``ValueError`` names the module, its tile / dtype and what is valid. Plain float layers,
    embeddings and norms are written as F32 / F16 / BF16 (see the module docstring). Llama's q/k rows are put in
    llama.cpp's order, which transformers' GGUF loader undoes, so ``AutoModelForCausalLM.from_pretrained(
    path.parent, gguf_file=path.name)`` rebuilds the same model.

    Args:
        model: the model; QA-BLoRA adapters must be merged first (``merge_and_unload()``).
        tokenizer: a byte-level BPE fast tokenizer (GPT-2 style, as SmolLM2's) written as llama.cpp's "gpt2"
            vocabulary, so that ``AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)`` rebuilds it; or
            ``None`` to write no tokenizer (transformers still loads the model; llama.cpp needs one).
        path: the ``.gguf`` file. Written to a temporary file in the same folder, then renamed.
        overwrite: replace an existing file (otherwise ``FileExistsError``).
        name: ``general.name`` (default: the model's ``name_or_path``).
        pre_tokenizer: llama.cpp's pre-tokenizer name (``tokenizer.ggml.pre``) when it cannot be inferred.
        allow_float: write a model without ``TileInt4Linear`` layers as an all-float GGUF (otherwise ``ValueError``:
            such a file is as large as the 16-bit model, rarely what an export to 4 bits meant).

    Returns:
        The path written.
    """
    gguf = _import_gguf()

    model = _unwrap(model)
    config = _check_llama(model)
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"folder {path.parent} does not exist")
    tensors, any_q4_1 = _llama_tensors(gguf, model, config)
    if not any_q4_1 and not allow_float:
        raise ValueError(
            f"export_gguf: {type(model).__name__} has no tile-INT4 layer, so the GGUF would hold float tensors only. "
            "Quantize it first, in the GGUF Q4_1 layout: quantize_model(model, tile=(32, 1), scale_dtype='float16', "
            "zero_dtype='float16'); or pass allow_float=True to write a float GGUF."
        )

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        try:
            writer.add_type(gguf.GGUFType.MODEL)
            writer.add_name(name or Path(str(getattr(config, "name_or_path", "") or "model")).name or "model")
            _write_llama_config(writer, config)
            if tokenizer is not None:
                write_tokenizer(writer, tokenizer, config.vocab_size, pre_tokenizer)
            file_type = gguf.LlamaFileType.MOSTLY_Q4_1 if any_q4_1 else gguf.LlamaFileType.ALL_F32
            writer.add_file_type(file_type)
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            for tensor_name, data, ggml_type in tensors:
                writer.add_tensor(tensor_name, data, raw_dtype=ggml_type)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()

    atomic_write(path, write, overwrite=overwrite)
    return path
