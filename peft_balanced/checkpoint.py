"""Adapter checkpoints: checks that make a broken one fail with a clear message naming the file instead of deep in a
loader, and atomic writes (temporary file + ``os.replace``) so that an interrupted save never leaves a half-written
file in place of a good one.

Policy for saving over an existing adapter directory: every file is replaced atomically, one by one (weights first,
then ``adapter_config.json``, as peft orders them). A crash while a file is written leaves the old file intact; a crash
between the two files leaves new weights next to the old config, which either fits them or fails to load with an
error naming the mismatch (see :meth:`CheckedCheckpointMixin.check_weight_shapes`). Our adapter types load from
safetensors and JSON only: a pickled ``adapter_model.bin`` is refused, never unpickled.
"""

from __future__ import annotations

import json
import os
import secrets
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], overwrite: bool = True) -> None:
    """Call ``write(tmp)`` on a fresh temporary name next to ``path``, flush it to disk, then rename it to ``path``.

    Readers see either the old file or the complete new one, never a partial file; on any error (or interrupt) the
    temporary file is removed and ``path`` is untouched. With ``overwrite=False`` an existing ``path`` (also one that
    appears while ``write`` runs) is never replaced: ``FileExistsError``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        _publish(tmp, path, overwrite)
    finally:
        tmp.unlink(missing_ok=True)


def _publish(tmp: Path, path: Path, overwrite: bool) -> None:
    """Move the finished ``tmp`` to ``path`` atomically; without ``overwrite`` never replace an existing file."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # atomic, and fails if ``path`` exists
    except FileExistsError:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it") from None
    except OSError:  # a filesystem without hard links
        if path.exists():
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it") from None
        os.replace(tmp, path)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_save_safetensors(tensors: dict, filename: str | os.PathLike, metadata: dict | None = None) -> None:
    """``safetensors.torch.save_file`` that writes atomically; installed as peft's adapter-weights writer."""
    import safetensors.torch

    atomic_write(filename, lambda tmp: safetensors.torch.save_file(tensors, str(tmp), metadata=metadata))


def read_adapter_config(path: Path) -> dict:
    """The JSON object of an ``adapter_config.json``; a ``ValueError`` naming the file if it is not valid JSON or
    not an object (e.g. a file cut short or edited by hand)."""
    try:
        with path.open(encoding="utf-8") as handle:
            content = json.load(handle)
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(
            f"The adapter config {str(path)!r} is not valid JSON ({err}). It was cut short or edited by hand: save "
            "the adapter again, or fix the file."
        ) from None
    if not isinstance(content, dict):
        raise ValueError(f"The adapter config {str(path)!r} must hold a JSON object, got {type(content).__name__}.")
    return content


def read_safetensors_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from the header of a complete safetensors file (see :func:`check_safetensors_file`)."""
    header = check_safetensors_file(path)
    return {key: tuple(value["shape"]) for key, value in header.items() if key != "__metadata__"}


def check_safetensors_file(path: str | os.PathLike) -> dict:
    """Raise ``ValueError`` if ``path`` is not a complete safetensors file (e.g. a copy that was cut short).

    Returns its parsed header.
    """
    path = Path(path)
    header: dict = {}
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
                    data_ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
                except (ValueError, TypeError, KeyError, IndexError, AttributeError):
                    problem = "its header is not valid"
                else:
                    data_end = max(data_ends, default=0)
                    expected = 8 + header_len + data_end
                    if size != expected:
                        problem = f"it should have {expected} bytes but has {size}"
    if problem:
        raise ValueError(
            f"The adapter weights file {str(path)!r} is truncated or corrupt: {problem}. "
            "Copy or save the adapter again."
        )
    return header


def adapter_weights_file(model_id: str | os.PathLike, subfolder: str | None = None) -> Path | None:
    """The checked safetensors weights of a local adapter directory; ``None`` for a Hub id.

    Raises a ``ValueError`` naming the file if only a pickled ``adapter_model.bin`` is there (our adapter types load
    from safetensors only and never unpickle), a ``FileNotFoundError`` if there are no weights, and the errors of
    :func:`check_safetensors_file` for a truncated or corrupt file.
    """
    directory = Path(model_id, subfolder) if subfolder else Path(model_id)
    if not directory.is_dir():
        return None
    safetensors_file = directory / SAFETENSORS_WEIGHTS_NAME
    if safetensors_file.is_file():
        check_safetensors_file(safetensors_file)
        return safetensors_file
    if (directory / WEIGHTS_NAME).is_file():
        raise ValueError(
            f"Refusing to load {str(directory / WEIGHTS_NAME)!r}: it is a pickle, and unpickling can run arbitrary "
            f"code. peft-balanced adapters load from {SAFETENSORS_WEIGHTS_NAME} only (save_pretrained writes it by "
            "default). If you trust the file, convert it yourself: torch.load(path, weights_only=True), then "
            "safetensors.torch.save_file(...)."
        )
    raise FileNotFoundError(
        f"No adapter weights in {str(directory)!r}: expected {SAFETENSORS_WEIGHTS_NAME} next to {CONFIG_NAME}. "
        "Was the adapter directory copied completely?"
    )


def check_local_adapter_dir(model_id: str | os.PathLike, subfolder: str | None = None) -> None:
    """If ``model_id`` is a local directory, require complete safetensors adapter weights in it (no-op for Hub ids)."""
    adapter_weights_file(model_id, subfolder)


class CheckedCheckpointMixin:
    """Config mixin: ``from_pretrained`` on a local directory first checks the adapter weights that go with it (complete
    safetensors whose shapes fit the config); ``save_pretrained`` writes ``adapter_config.json`` atomically."""

    def expected_rank_dims(self) -> dict[str, tuple[int, int]]:
        """``{tensor-name marker: (dim, size)}``: checkpoint tensors whose name contains the marker must have ``size``
        along ``dim`` (the adapter's inner rank, which the config fixes whatever the base model)."""
        return {}

    def check_weight_shapes(self, shapes: dict[str, tuple[int, ...]], path: str | os.PathLike) -> None:
        """Raise ``ValueError`` naming ``path`` if a tensor's inner rank differs from what this config says."""
        for marker, (dim, size) in self.expected_rank_dims().items():
            for key, shape in shapes.items():
                if marker in key and (len(shape) <= dim or shape[dim] != size):
                    fields = ", ".join(f"{f}={getattr(self, f)}" for f in ("r", "balance_factor") if hasattr(self, f))
                    module = key.partition(marker)[0].removeprefix("base_model.model.")
                    raise ValueError(
                        f"The adapter weights {str(path)!r} do not match their config ({fields}, so dimension {dim} of "
                        f"every '{marker}' tensor must be {size}): in module {module!r}, {key} has shape {shape}. The "
                        "config was edited or belongs to another adapter; save the adapter again or restore its "
                        "adapter_config.json."
                    )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs):
        weights = adapter_weights_file(pretrained_model_name_or_path, subfolder)
        try:
            config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        except ValueError as err:
            where = str(Path(pretrained_model_name_or_path, subfolder or "", CONFIG_NAME))
            if where in str(err):
                raise
            raise ValueError(f"Invalid adapter config {where!r}: {err}") from err
        if weights is not None:
            config.check_weight_shapes(read_safetensors_shapes(weights), weights)
        return config

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """Write ``adapter_config.json`` to ``save_directory`` atomically (the same JSON as peft writes)."""
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {save_directory!r} is a file; pass a directory.")
        os.makedirs(save_directory, exist_ok=True)
        directory = Path(save_directory)
        if (directory / WEIGHTS_NAME).is_file() and not (directory / SAFETENSORS_WEIGHTS_NAME).is_file():
            raise ValueError(
                f"{str(directory / WEIGHTS_NAME)!r} was written as a pickle (save_pretrained(safe_serialization=False) "
                f"or Trainer(save_safetensors=False)); peft-balanced adapters load from {SAFETENSORS_WEIGHTS_NAME} "
                "only, so this checkpoint could not be loaded. Save with safe_serialization=True (the default)."
            )
        auto_mapping_dict = kwargs.pop("auto_mapping_dict", None)
        output = {key: list(value) if isinstance(value, set) else value for key, value in self.to_dict().items()}
        if auto_mapping_dict is not None:
            output["auto_mapping"] = auto_mapping_dict
        atomic_write_text(os.path.join(save_directory, CONFIG_NAME), json.dumps(output, indent=2, sort_keys=True))
