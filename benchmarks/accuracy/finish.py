"""What happens to a trained adapter before it is scored, and how results are kept (part of accuracy.py).

Finishes (``Method.finish``), i.e. the model a user would deploy:

- ``none``: the adapter model as trained.
- ``merge_int4``: QA-BLoRA merged into its tile-INT4 base (exact: the update lands in the per-tile zero points).
- ``ptq_int4``: the adapter's update ΔW added to the ORIGINAL 16-bit weights, then rounded to nearest into the same
  2-D-tile INT4 format, tile and bits as QA-BLoRA (``peft_balanced.quantize_model``). The fair 4-bit baseline: the
  paper's own merges QLoRA into 16 bits and quantizes that (with GPTQ; round-to-nearest here).
- ``ptq_nf4``: ΔW added to the original 16-bit weights, then NF4 with double quantization.
- ``requant_nf4``: a strawman kept for comparison: QLoRA merged into the NF4-DEQUANTIZED weights and re-quantized
  to NF4. Every entry of ΔW smaller than half an NF4 code step rounds back to the old code, so little of the
  update survives.
"""

from __future__ import annotations

import copy
import datetime
import fcntl
import json
import os
import pathlib
import warnings

import torch
from torch import nn

import peft_balanced
from peft_balanced.demo.models import LLAMA_PROJECTIONS, quantize_linear_nf4


def save_dir(out: pathlib.Path, name: str) -> pathlib.Path:
    """``out/models/name``, or a timestamped sibling when that exists (a saved model is never overwritten)."""
    path = out / "models" / name
    if path.exists():
        path = path.with_name(f"{name}-{datetime.datetime.now():%Y%m%d-%H%M%S-%f}")
    return path


def save_atomically(obj, path: pathlib.Path, tokenizer=None) -> str:
    """``obj.save_pretrained`` into a temporary sibling, renamed to ``path`` when complete."""
    tmp = path.with_name(path.name + f".partial-{os.getpid()}")
    with warnings.catch_warnings():  # the GGUF folder has no config.json; the vocabulary is unchanged anyway
        warnings.filterwarnings("ignore", message="Could not find a config file")
        obj.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, path)
    return str(path)


def merge_into_original(peft_model: nn.Module, pristine: nn.Module, device, dtype: torch.dtype) -> nn.Module:
    """A copy of the pristine 16-bit base with every LoRA layer's ΔW (``get_delta_weight``) added to its weight.

    For QLoRA this is the merge the paper quantizes: the update goes into the original weights, not into the
    NF4-dequantized ones the adapter was trained on. The sum is taken in float32 and rounded once to ``dtype``.
    """
    from peft.tuners.lora import LoraLayer

    dense = copy.deepcopy(pristine).to(device=device, dtype=dtype)
    merged = 0
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer) or not module.active_adapters:
            continue
        target = dense.get_submodule(name.removeprefix("base_model.model."))
        delta = sum(module.get_delta_weight(a).float() for a in module.active_adapters if a in module.lora_A)
        target.weight.data = (target.weight.data.float() + delta.to(target.weight.device)).to(dtype)
        merged += 1
    if not merged:
        raise RuntimeError("merge_into_original: the model has no LoRA layers to merge")
    return dense


def finish(method, peft_model: nn.Module, bench, directory: pathlib.Path | None) -> nn.Module:
    """The model ``method`` is evaluated as (see the module docstring)."""
    s = bench.settings
    if method.finish == "none":
        return peft_model
    if method.finish == "merge_int4":
        merged = peft_model.merge_and_unload()
        left = [n for n, m in merged.named_modules() if n.rsplit(".", 1)[-1] in LLAMA_PROJECTIONS and
                not isinstance(m, peft_balanced.TileInt4Linear)]  # fmt: skip
        if left:
            raise RuntimeError(f"{method.name}: merged model has non-INT4 projections, e.g. {left[0]}")
        if directory is not None:
            save_atomically(merged, directory / "merged-int4", bench.tokenizer)
        return merged
    if method.finish in ("ptq_int4", "ptq_nf4"):
        dense = merge_into_original(peft_model, bench.model, s.device, s.torch_dtype)
        if method.finish == "ptq_int4":
            return peft_balanced.quantize_model(dense, tile=method.tile)
        quantize_linear_nf4(dense, compute_dtype=s.torch_dtype, double_quant=True)
        return dense
    if method.finish == "requant_nf4":
        from peft_balanced.demo.merge import merge_to_dense

        merged = merge_to_dense(peft_model, dtype=s.torch_dtype)
        quantize_linear_nf4(merged, compute_dtype=s.torch_dtype, double_quant=True)
        return merged
    raise ValueError(f"unknown finish {method.finish!r}")


def append_record(out: pathlib.Path, record: dict) -> None:
    """Append one JSON line to ``out/results.jsonl`` under an exclusive lock (parallel workers share the file),
    flushed to disk so that a later crash keeps it."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.jsonl", "a", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
