"""Record warnings with the code that caused them (imports nothing from peft_balanced)."""

from __future__ import annotations

import contextlib
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

LIBRARIES = ("/transformers/", "/peft/", "/trl/", "/accelerate/", "/torch/", "/datasets/", "/huggingface_hub/")


@dataclass
class Recorded:
    category: type[Warning]
    message: str
    origin: str  # file of the innermost frame that is not inside a third-party library or the warnings machinery


def _origin(stack: list[traceback.FrameSummary]) -> str:
    for frame in reversed(stack):
        name = frame.filename.replace("\\", "/")
        if name.endswith("/warnings.py") or __file__ == frame.filename:
            continue
        if not any(lib in name for lib in LIBRARIES):
            return name
    return ""


@contextlib.contextmanager
def recorded_warnings() -> Iterator[list[Recorded]]:
    """Every warning raised inside the block (filters reset to 'always'; scoped filters set inside still apply)."""
    records: list[Recorded] = []

    def show(message, category, filename, lineno, file=None, line=None):
        records.append(Recorded(category, str(message), _origin(traceback.extract_stack())))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        yield records


def deprecations_from(records: list[Recorded], package_dir: str) -> list[Recorded]:
    """The FutureWarning / DeprecationWarning records caused by code under ``package_dir``."""
    return [
        r for r in records if issubclass(r.category, (FutureWarning, DeprecationWarning)) and package_dir in r.origin
    ]
