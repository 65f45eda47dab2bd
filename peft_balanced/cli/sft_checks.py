"""Checks of ``peft-balanced sft`` arguments that run before any model is loaded.

Two stages: :func:`check_flags` looks only at the parsed arguments (wrong method / flag combinations), then
:func:`check_model_shapes` reads the model's ``config.json`` (no weights) and checks that the balance factor or
tile divides every targeted projection. Both raise :class:`SFTArgumentError` with a message naming the flag, the
value and what is valid.
"""

from __future__ import annotations

import glob
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..validation import check_tile

__all__ = [
    "METHODS",
    "REMOTE_CODE_FLAG",
    "SFTArgumentError",
    "check_flags",
    "check_model_shapes",
    "check_no_remote_code",
    "local_data_files",
    "parse_tile",
    "projection_shapes",
]

METHODS = ("blora", "qablora", "gradapprox")
DEFAULT_BALANCE_FACTOR = 2
DEFAULT_TILE = (4, 8)
# TRL's flag (and transformers' keyword) that would run Python code shipped with a model. This command refuses it and
# the package never passes it (models load through safetensors and JSON only; tests/test_checkpoint_files.py checks
# every call and dict in the package for a value other than False).
REMOTE_CODE_FLAG = "trust_remote_code"

DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


class SFTArgumentError(ValueError):
    """A wrong ``peft-balanced sft`` argument or combination; printed without a traceback, exit status 2."""


def parse_tile(text: str | Iterable[int]) -> tuple[int, int]:
    """``"4,8"`` (or ``"4x8"``, or a pair) -> ``(4, 8)``: λ1 input features x λ2 output features per tile."""
    items = text.replace("x", ",").split(",") if isinstance(text, str) else list(text)
    try:
        return check_tile([int(item) for item in items])
    except (TypeError, ValueError):
        raise SFTArgumentError(f"--tile must be two positive integers 'λ1,λ2' such as 4,8; got {text!r}") from None


def _reject(given: set[str], method: str, flags: Iterable[str], why: str) -> None:
    bad = [f"--{flag}" for flag in flags if flag in given]
    if bad:
        raise SFTArgumentError(f"{', '.join(bad)} cannot be used with --peft_method {method}: {why}")


def check_flags(balanced: Any, model_args: Any, script_args: Any, given: set[str]) -> None:
    """Reject wrong combinations of ``--peft_method`` and the other flags, from the parsed arguments alone.

    ``given`` holds the flag names (underscored, without ``--``) the user passed explicitly, so that flags whose
    TRL default cannot be told apart from an explicit value (``--lora_r 16``) are still caught.
    """
    method = balanced.peft_method
    if method not in METHODS:
        raise SFTArgumentError(f"--peft_method must be one of {', '.join(METHODS)}; got {method!r}")
    if balanced.balance_factor is not None:
        given.add("balance_factor")
    if balanced.tile is not None:
        given.add("tile")
    if balanced.approximator_depth is not None:
        given.add("approximator_depth")
    if balanced.gradapprox_init_batches is not None:
        given.add("gradapprox_init_batches")
    if balanced.merged_dtype != "auto":
        given.add("merged_dtype")
    if balanced.use_lora_lr:
        given.add("use_lora_lr")
    if model_args.load_in_8bit:
        given.add("load_in_8bit")
    if model_args.use_bnb_nested_quant:
        given.add("use_bnb_nested_quant")
    if model_args.bnb_4bit_quant_type != "nf4":
        given.add("bnb_4bit_quant_type")
    if model_args.bnb_4bit_quant_storage is not None:
        given.add("bnb_4bit_quant_storage")
    if method == "blora":
        _reject(given, method, ["tile"], "BLoRA has one balance factor; use --balance_factor (tiles are QA-BLoRA's)")
    if method == "qablora":
        _reject(given, method, ["balance_factor"], "QA-BLoRA's pooling is set by --tile λ1,λ2")
        _reject(given, method, ["lora_r"], "QA-BLoRA has no rank (one full matrix on the tile grid)")
        _reject(given, method, ["load_in_8bit"], "QA-BLoRA trains on the 2-D-tile INT4 format (--load_in_4bit)")
        bnb_flags = ["bnb_4bit_quant_type", "use_bnb_nested_quant", "bnb_4bit_quant_storage"]
        _reject(given, method, bnb_flags, "for QA-BLoRA, --load_in_4bit means the tile INT4 format, not bitsandbytes")
        _reject(
            given,
            method,
            ["merged_dtype"],
            "its --merge keeps the model 4-bit (the adapter goes into the zero points)",
        )
    if method == "gradapprox":
        _reject(given, method, ["balance_factor", "tile", "use_lora_lr"], "GradApprox is a plain low-rank adapter")
    else:
        _reject(given, method, ["approximator_depth", "gradapprox_init_batches"], "these are GradApprox options")
    for flag in ("use_dora", "use_rslora"):
        if getattr(model_args, flag):
            raise SFTArgumentError(f"--{flag} is a LoRA option; peft-balanced methods do not support it")
    if model_args.lora_target_parameters is not None:
        raise SFTArgumentError("--lora_target_parameters is a LoRA option; use --lora_target_modules")
    if balanced.balance_factor is not None and balanced.balance_factor < 1:
        raise SFTArgumentError(f"--balance_factor must be a positive integer; got {balanced.balance_factor}")
    if balanced.tile is not None:
        parse_tile(balanced.tile)
    depth = balanced.approximator_depth
    if depth is not None and not 0 <= depth <= 5:
        raise SFTArgumentError(f"--approximator_depth must be 0 (off) or 1..5; got {depth}")
    if balanced.gradapprox_init_batches is not None and balanced.gradapprox_init_batches < 1:
        raise SFTArgumentError(f"--gradapprox_init_batches must be positive; got {balanced.gradapprox_init_batches}")
    if not model_args.model_name_or_path:
        raise SFTArgumentError("--model_name_or_path is required (a Hub id or a local model directory)")
    if not script_args.dataset_name:
        raise SFTArgumentError("--dataset_name is required (a Hub id, a dataset directory, or .json/.jsonl/.parquet)")


def check_no_remote_code(training_args: Any, model_args: Any) -> None:
    """Refuse TRL's remote-code flag (a ``ModelConfig`` field in TRL 1.0, an ``SFTConfig`` one later) and the same
    key in ``--model_init_kwargs``: peft-balanced loads models from safetensors and JSON only, never their code."""
    init_kwargs = getattr(training_args, "model_init_kwargs", None) or {}
    if (
        getattr(training_args, REMOTE_CODE_FLAG, False)
        or getattr(model_args, REMOTE_CODE_FLAG, False)
        or (isinstance(init_kwargs, Mapping) and init_kwargs.get(REMOTE_CODE_FLAG))
    ):
        raise SFTArgumentError(
            f"--{REMOTE_CODE_FLAG} is refused: peft-balanced sft never runs code shipped with a model. Use a model "
            "whose architecture transformers implements (Llama, Mistral, Qwen, Gemma, SmolLM, ...)."
        )


def projection_shapes(config: Any) -> dict[str, tuple[int, int]]:
    """``{name: (D_in, D_out)}`` of the standard decoder projections, from a transformers (text) config.

    Covers the Llama-style names (``q_proj`` ... ``down_proj``) that Llama, Mistral, Qwen, Gemma and SmolLM use;
    returns ``{}`` for configs without ``hidden_size`` / ``num_attention_heads``.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(text, "hidden_size", None)
    heads = getattr(text, "num_attention_heads", None)
    if not hidden or not heads:
        return {}
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    shapes = {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv_heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim),
        "o_proj": (heads * head_dim, hidden),
    }
    intermediate = getattr(text, "intermediate_size", None)
    if intermediate:
        shapes |= {"gate_proj": (hidden, intermediate), "up_proj": (hidden, intermediate)}
        shapes["down_proj"] = (intermediate, hidden)
    return shapes


def _targeted(shapes: Mapping[str, tuple[int, int]], targets: str | list[str]) -> dict[str, tuple[int, int]]:
    if targets == "all-linear":
        return dict(shapes)
    if isinstance(targets, str):  # a regex: peft resolves it; check the projections it names
        return {name: shape for name, shape in shapes.items() if name in targets}
    return {name: shapes[name] for name in targets if name in shapes}


def _dims_note(config: Any) -> str:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim")
    return ", ".join(f"{k}={getattr(text, k)}" for k in keys if getattr(text, k, None))


def _tile_int4_tile(config: Any) -> tuple[int, int] | None:
    quant = getattr(config, "quantization_config", None)
    quant = quant.to_dict() if hasattr(quant, "to_dict") else quant
    if isinstance(quant, Mapping) and quant.get("quant_method") == "tile_int4":
        return parse_tile(quant.get("tile", DEFAULT_TILE))
    return None


def check_model_shapes(
    balanced: Any, model_args: Any, config: Any, targets: str | list[str]
) -> tuple[int, int] | None:
    """Check the method against the model's config (read without weights); returns the tile for QA-BLoRA.

    BLoRA: λ divides D_in and D_out of every targeted projection. QA-BLoRA: the base is (or will be) tile INT4 —
    ``--load_in_4bit`` quantizes every linear but ``lm_head`` on load, so λ1 divides every projection's D_in and
    λ2 its D_out; a model saved in tile INT4 needs no ``--load_in_4bit`` and fixes the tile.
    """
    shapes = projection_shapes(config)
    method = balanced.peft_method
    saved_tile = _tile_int4_tile(config)
    if saved_tile is not None and method != "qablora" and model_args.load_in_4bit:
        raise SFTArgumentError(f"{model_args.model_name_or_path} is already tile-INT4 quantized; drop --load_in_4bit")
    if method == "blora":
        lam = balanced.balance_factor or DEFAULT_BALANCE_FACTOR
        for name, (d_in, d_out) in _targeted(shapes, targets).items():
            if d_in % lam or d_out % lam:
                valid = math.gcd(*(d for shape in _targeted(shapes, targets).values() for d in shape))
                divisors = [d for d in range(1, min(valid, 64) + 1) if valid % d == 0]
                raise SFTArgumentError(
                    f"--balance_factor {lam} does not divide {name} (D_in={d_in}, D_out={d_out}) of "
                    f"{model_args.model_name_or_path} ({_dims_note(config)}); balance factors that divide every "
                    f"targeted projection: {divisors}"
                )
        return None
    if method != "qablora":
        return None
    quant = getattr(config, "quantization_config", None)
    if quant is not None and saved_tile is None:
        raise SFTArgumentError(
            f"QA-BLoRA needs a tile-INT4 base, but {model_args.model_name_or_path} is saved with another "
            "quantization; start from its 16-bit checkpoint with --load_in_4bit"
        )
    tile = parse_tile(balanced.tile) if balanced.tile is not None else (saved_tile or DEFAULT_TILE)
    if saved_tile is not None:
        if tile != saved_tile:
            raise SFTArgumentError(
                f"--tile {tile[0]},{tile[1]} does not match the tile {saved_tile[0]},{saved_tile[1]} that "
                f"{model_args.model_name_or_path} is quantized with"
            )
        return tile
    if not model_args.load_in_4bit:
        raise SFTArgumentError(
            "--peft_method qablora trains on the 2-D-tile INT4 format: pass --load_in_4bit (quantizes the model "
            f"to tile INT4 with --tile {tile[0]},{tile[1]} on load) or start from a model saved in tile INT4"
        )
    l1, l2 = tile
    for name, (d_in, d_out) in shapes.items():
        if d_in % l1 or d_out % l2 or d_in % 2:
            raise SFTArgumentError(
                f"--tile {l1},{l2} does not fit {name} (D_in={d_in}, D_out={d_out}) of "
                f"{model_args.model_name_or_path} ({_dims_note(config)}): λ1 must divide every D_in "
                f"({sorted({s[0] for s in shapes.values()})}) and λ2 every D_out "
                f"({sorted({s[1] for s in shapes.values()})})"
            )
    return tile


def local_data_files(name: str) -> tuple[str, list[str]] | None:
    """``(builder, files)`` for a local file spec (suffix .json/.jsonl/.parquet/.csv, globs allowed), else ``None``."""
    builder = DATA_FILE_BUILDERS.get(Path(name).suffix.lower())
    if builder is None:
        return None
    files = sorted(glob.glob(name)) if glob.has_magic(name) else [name]
    files = [f for f in files if Path(f).is_file()]
    if not files:
        raise SFTArgumentError(f"--dataset_name {name}: no such file (local {builder} data)")
    return builder, files
