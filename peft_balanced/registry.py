"""Registration of peft-balanced's PEFT types with peft.

peft has no plugin entry point: ``register_peft_method`` only accepts names that are already members of
``peft.utils.PeftType``. We therefore add our members to that enum at runtime, then register the config and
tuner classes. Every step is idempotent, so importing ``peft_balanced`` twice (or reloading it) is harmless.
"""

from __future__ import annotations

from peft.utils import PeftType, register_peft_method

#: PeftType names this package owns, including the ones reserved for tuners still being built.
OWNED_PEFT_TYPES: tuple[str, ...] = ("BLORA", "QABLORA", "GRADAPPROX")


def extend_peft_type(name: str) -> PeftType:
    """Return ``PeftType[name]``, adding it to peft's enum first if it is not a member yet."""
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


def register(name: str, config_cls: type, model_cls: type, prefix: str) -> None:
    """Register one tuner with peft (idempotent).

    If a previous import registered older class objects (e.g. after ``importlib.reload``), the mappings are
    pointed at the new classes so that ``isinstance`` checks keep working.
    """
    from ._compat import peft_method_mappings

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


def reserve_owned_types() -> None:
    """Make every name in :data:`OWNED_PEFT_TYPES` a ``PeftType`` member."""
    for name in OWNED_PEFT_TYPES:
        extend_peft_type(name)


def _packed_tile_int4_weights(model) -> int:
    """Number of weights stored 4-bit in ``TileInt4Linear`` buffers of ``model`` (``D_out · D_in`` per layer)."""
    import sys

    quant_linear = sys.modules.get("peft_balanced.quant.linear")
    if quant_linear is None:
        return 0
    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, quant_linear.TileInt4Linear))


def count_packed_weights() -> None:
    """Make ``PeftModel.get_nb_trainable_parameters`` (and so ``print_trainable_parameters``) count the frozen 4-bit
    weights of ``TileInt4Linear`` layers, as peft counts bitsandbytes' ``Params4bit``: a TileInt4Linear keeps them
    in buffers, which peft's count (over parameters) would leave out. Idempotent."""
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
