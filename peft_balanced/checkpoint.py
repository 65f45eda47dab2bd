"""Checks on adapter checkpoints, so that a broken one fails with a clear message instead of deep in a loader."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME


def check_safetensors_file(path: str | os.PathLike) -> None:
    """Raise ``ValueError`` if ``path`` is not a complete safetensors file (e.g. a copy that was cut short)."""
    path = Path(path)
    size = path.stat().st_size
    problem = None
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            problem = f"it has only {size} bytes"
        else:
            (header_len,) = struct.unpack("<Q", prefix)
            if 8 + header_len > size:
                problem = f"its header claims {header_len} bytes but the file has {size} bytes"
            else:
                try:
                    header = json.loads(handle.read(header_len))
                except ValueError:
                    problem = "its header is not valid JSON"
                else:
                    data_end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
                    expected = 8 + header_len + data_end
                    if size != expected:
                        problem = f"it should have {expected} bytes but has {size}"
    if problem:
        raise ValueError(
            f"The adapter weights file {str(path)!r} is truncated or corrupt: {problem}. "
            "Copy or save the adapter again."
        )


def check_local_adapter_dir(model_id: str | os.PathLike, subfolder: str | None = None) -> None:
    """If ``model_id`` is a local directory, require complete adapter weights in it (no-op for Hub ids)."""
    directory = Path(model_id, subfolder) if subfolder else Path(model_id)
    if not directory.is_dir():
        return
    safetensors_file = directory / SAFETENSORS_WEIGHTS_NAME
    if safetensors_file.is_file():
        check_safetensors_file(safetensors_file)
    elif not (directory / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(
            f"No adapter weights in {str(directory)!r}: expected {SAFETENSORS_WEIGHTS_NAME} (or {WEIGHTS_NAME}) "
            "next to adapter_config.json. Was the adapter directory copied completely?"
        )


class CheckedCheckpointMixin:
    """Config mixin: ``from_pretrained`` on a local directory first checks the adapter weights that go with it."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs):
        check_local_adapter_dir(pretrained_model_name_or_path, subfolder)
        return super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
