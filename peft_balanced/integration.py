"""Every change peft-balanced makes to peft and transformers, in one place.

Neither library has a plugin mechanism, so a third-party PEFT method or quantization format has to be added to their
tables at runtime. This module holds each of those patches, with why it exists and what it changes for peft's own
methods; :func:`install` applies them (``import peft_balanced`` calls it, and each tuner package calls
:func:`register_method` for itself, as peft's tuners call ``register_peft_method``). Every patch is idempotent:
importing the package twice, or reloading it, is harmless. ``tests/test_integration.py`` checks each one.

============================  =====================================  ==============================================
patch                         target                                 effect on peft's own methods
============================  =====================================  ==============================================
PEFT type names               ``peft.utils.PeftType`` (an Enum)      none: members are only added
method registration           peft's config / tuner / prefix tables  none: keys are only added
4-bit weights in the count    ``PeftModel.get_nb_trainable_           none unless the base has ``TileInt4Linear``
                              parameters``                           layers (their buffers are then counted too)
atomic adapter weights        ``peft.peft_model.safe_save_file``     the same bytes, written to a temporary file
                                                                     and renamed: a crash never leaves half a file
named config-file errors      ``PeftConfigMixin.from_json_file``     valid files load unchanged; invalid JSON and
                                                                     an unknown ``peft_type`` raise ``ValueError``
                                                                     naming the file (peft: a bare
                                                                     ``JSONDecodeError``, itself a ``ValueError``,
                                                                     or ``KeyError``)
``tile_int4`` quantization    transformers' quantizer tables         none: keys are only added
start-up hook                 ``peft_balanced_startup.pth`` ->       only lookups of *our* names change: a clear
                              :mod:`._startup`                       error instead of ``KeyError: 'BLORA'`` / a
                                                                     silently skipped quantization, when an
                                                                     artefact of ours is loaded before the import
============================  =====================================  ==============================================

Private names these patches reach are imported through :mod:`._compat` only.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from peft.utils import PeftType, register_peft_method

from ._startup import OWNED_PEFT_TYPES, OWNED_QUANT_METHODS

__all__ = [
    "OWNED_PEFT_TYPES",
    "OWNED_QUANT_METHODS",
    "count_packed_weights",
    "extend_peft_type",
    "install",
    "name_config_file_errors",
    "register_method",
    "write_adapter_weights_atomically",
]


def extend_peft_type(name: str) -> PeftType:
    """Return ``PeftType[name]``, adding it to peft's enum first if it is not a member yet.

    Why: ``register_peft_method`` only accepts names that are already ``PeftType`` members.
    """
    if name not in OWNED_PEFT_TYPES:
        raise ValueError(f"{name!r} is not a PEFT type of peft-balanced; its types are {', '.join(OWNED_PEFT_TYPES)}.")
    if name in PeftType.__members__:
        return PeftType[name]
    add_member = getattr(PeftType, "_add_member_", None)  # CPython >= 3.13
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member.__init__(name)
    if add_member is not None:
        add_member(name, member)
    else:  # CPython 3.10 - 3.12: update the enum's lookup tables by hand
        type.__setattr__(PeftType, name, member)
        PeftType._member_map_[name] = member
        PeftType._value2member_map_[name] = member
        PeftType._member_names_.append(name)
    return PeftType[name]


def register_method(config_cls: type, model_cls: type) -> None:
    """Register one tuner with peft under ``config_cls.PEFT_TYPE_NAME`` and ``model_cls.prefix`` (idempotent).

    If a previous import registered older class objects (after ``importlib.reload``), the tables are pointed at the
    new classes so that ``isinstance`` checks keep working.
    """
    from ._compat import peft_method_mappings

    name, prefix = config_cls.PEFT_TYPE_NAME, model_cls.prefix
    config_mapping, tuner_mapping, prefix_mapping = peft_method_mappings()
    peft_type = extend_peft_type(name)
    if peft_type in config_mapping:
        config_mapping[peft_type] = config_cls
        tuner_mapping[peft_type] = model_cls
        prefix_mapping[peft_type] = prefix
        return
    for other_type, other_prefix in prefix_mapping.items():
        if other_prefix in prefix or prefix in other_prefix:
            raise ValueError(
                f"Prefix {prefix!r} of {name} overlaps the prefix {other_prefix!r} of {other_type}; peft matches "
                "prefixes by substring, so they must not contain one another."
            )
    register_peft_method(name=name.lower(), config_cls=config_cls, model_cls=model_cls, prefix=prefix)


def _packed_tile_int4_weights(model) -> int:
    """Number of weights stored 4-bit in ``TileInt4Linear`` buffers of ``model`` (``D_out · D_in`` per layer)."""
    quant_linear = sys.modules.get("peft_balanced.quant.linear")
    if quant_linear is None:
        return 0
    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, quant_linear.TileInt4Linear))


def count_packed_weights() -> None:
    """``PeftModel.get_nb_trainable_parameters`` (and so ``print_trainable_parameters``) also counts the frozen
    4-bit weights of ``TileInt4Linear`` layers.

    Why: peft counts bitsandbytes' ``Params4bit`` weights, which are parameters; a ``TileInt4Linear`` keeps its
    packed weights in buffers, which peft's count would leave out. Models without such layers count as before.
    """
    from peft import PeftModel

    original = PeftModel.get_nb_trainable_parameters
    if getattr(original, "__peft_balanced_counts_tile_int4__", False):
        return

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable, total = original(self)
        return trainable, total + _packed_tile_int4_weights(self)

    get_nb_trainable_parameters.__doc__ = original.__doc__
    get_nb_trainable_parameters.__peft_balanced_counts_tile_int4__ = True
    PeftModel.get_nb_trainable_parameters = get_nb_trainable_parameters


def write_adapter_weights_atomically() -> None:
    """``PeftModel.save_pretrained`` writes ``adapter_model.safetensors`` through an atomic writer.

    Why: peft writes the file in place, so a crash mid-save over an existing adapter leaves a truncated file where a
    good one was. The bytes written are those of ``safetensors.torch.save_file``; only the publication is atomic.
    peft has one writer for all methods, so this applies to its own methods too.
    """
    from ._compat import set_peft_weights_writer
    from .checkpoint import atomic_save_safetensors

    set_peft_weights_writer(atomic_save_safetensors)


def _checked_from_json_file(original: classmethod) -> classmethod:
    def from_json_file(cls, path_json_file: str, **kwargs: Any) -> dict:
        from ._compat import peft_method_mappings
        from .checkpoint import read_adapter_config

        path = Path(path_json_file)
        peft_type = read_adapter_config(path).get("peft_type")
        if peft_type is not None:
            known = sorted(str(getattr(t, "value", t)) for t in peft_method_mappings()[0])
            if peft_type not in known:
                raise ValueError(
                    f"The adapter config {str(path)!r} has an unknown peft_type {peft_type!r}; known types: "
                    f"{', '.join(known)}. An adapter of a plugin's type needs that plugin imported first."
                )
        return original.__func__(cls, path_json_file, **kwargs)

    from_json_file.__peft_balanced_checked__ = True  # type: ignore[attr-defined]
    return classmethod(from_json_file)


def name_config_file_errors() -> None:
    """``PeftConfigMixin.from_json_file`` raises a ``ValueError`` naming the file for invalid JSON, a JSON value that
    is not an object, and an unknown ``peft_type``; valid files are read by peft's own function, unchanged.

    Why: peft raises a bare ``JSONDecodeError`` (no file name) or a ``KeyError`` deep in its loader.
    """
    from peft.config import PeftConfigMixin

    current = PeftConfigMixin.__dict__["from_json_file"]
    if not getattr(current.__func__, "__peft_balanced_checked__", False):
        PeftConfigMixin.from_json_file = _checked_from_json_file(current)


def install() -> None:
    """Apply every patch of this module and register the ``tile_int4`` quantization method (idempotent).

    The tuners register themselves when their packages are imported (:func:`register_method`).
    """
    for name in OWNED_PEFT_TYPES:
        extend_peft_type(name)
    count_packed_weights()
    write_adapter_weights_atomically()
    name_config_file_errors()
    from .quant.hf import register_tile_int4

    register_tile_int4()
