"""Scoped filters for deprecation notices that upstream libraries raise about themselves (imports nothing heavy)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_peft_checkpointing_alias() -> Iterator[None]:
    """Silence transformers' ``is_gradient_checkpointing`` deprecation notice raised by peft's own code.

    peft (0.21) reads ``model.is_gradient_checkpointing`` in ``PeftModel.__init__``; transformers >= 5.23 made that
    a deprecated alias of ``is_activation_checkpointing``. Users cannot act on it, so the commands of this package
    hide exactly that message while building a ``PeftModel``; every other warning still shows.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield
