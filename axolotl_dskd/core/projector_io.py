"""Saving and loading the trained projectors: safetensors only, written atomically.

A checkpoint folder or ``output_dir`` holds ``dskd_projectors.safetensors`` and a small JSON
of the shapes and the loss config, enough to warm-start a new run with ``dskd_projectors``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from axolotl_dskd.core.files import atomic_write, atomic_write_text

WEIGHTS_NAME = "dskd_projectors.safetensors"
META_NAME = "dskd_projectors.json"


def save_projectors(projectors: nn.Module, directory: str | os.PathLike, meta: dict) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in projectors.state_dict().items()}
    weights = directory / WEIGHTS_NAME
    atomic_write(weights, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    shapes = {k: list(v.shape) for k, v in tensors.items()}
    body = json.dumps({"shapes": shapes, **meta}, indent=2, sort_keys=True, default=str)
    atomic_write_text(directory / META_NAME, body)
    return weights


def projectors_file(path: str | os.PathLike) -> Path:
    """The weights file for ``path``, which may name the file or a folder holding it."""
    path = Path(path)
    return path / WEIGHTS_NAME if path.is_dir() else path


def read_projector_shapes(path: str | os.PathLike, key: str) -> tuple[Path, dict[str, tuple[int, ...]]]:
    """The weights file for ``path`` and its tensors' shapes, from the safetensors header only.

    Anything but a readable ``.safetensors`` file (a pickle such as ``.bin`` / ``.pt``, a
    missing or corrupt file) is refused naming ``key``; nothing is ever unpickled.
    """
    file = projectors_file(path)
    if file.suffix != ".safetensors":
        raise ValueError(
            f"{key}: {str(file)!r} is not a .safetensors file; projectors are only read as "
            f"safetensors (never a pickle). Point {key} at a dskd_projectors.safetensors file or "
            "the checkpoint folder holding it."
        )
    if not file.is_file():
        raise ValueError(f"{key}: no projector file at {str(file)!r}")
    try:
        with safe_open(file, framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - not iterable
    except Exception as exc:  # safetensors raises its own error types on a bad header
        raise ValueError(f"{key}: {str(file)!r} is not a readable safetensors file ({exc})") from exc
    return file, shapes


def check_projector_shapes(
    file: Path, found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], key: str
) -> None:
    if expected != found:
        found, expected = dict(sorted(found.items())), dict(sorted(expected.items()))
        raise ValueError(
            f"{key}: the projectors in {str(file)!r} have shapes {found}, but this student/teacher "
            f"pair needs {expected}. Point {key} at projectors trained for the same pair."
        )


def load_projectors(projectors: nn.Module, path: str | os.PathLike, key: str) -> None:
    """Copy saved weights into ``projectors``; refuse a file that does not fit, naming ``key``."""
    file, found = read_projector_shapes(path, key)
    expected = {k: tuple(v.shape) for k, v in projectors.state_dict().items()}
    check_projector_shapes(file, found, expected, key)
    projectors.load_state_dict(load_file(file))
