"""A tiny checkpoint on disk: the marker file that says it is one, its policy type, dims and tokenizer folder.

A tiny checkpoint is a normal ``--policy.path`` directory plus a marker file (:data:`MARKER_NAME`)
holding its dims, so loaders know to rebuild it tiny (:func:`attnstore.capture.tiny.tiny_model_patches`),
and its own offline tokenizer (:data:`TOKENIZER_DIRNAME`; SmolVLA's: its tiny VLM's folder).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from attnstore.capture.tiny_dims import TinyDims
from attnstore.errors import CaptureError

MARKER_NAME = "attnstore_tiny.json"
TOKENIZER_DIRNAME = "tokenizer"


def is_tiny_checkpoint(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a directory written by :func:`make_tiny_policy` (it holds the marker)."""
    return (Path(path) / MARKER_NAME).is_file()


def read_marker(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A tiny checkpoint's marker (its policy type, dims, cameras, seed), or a one-line error."""
    marker = Path(path) / MARKER_NAME
    try:
        data = json.loads(marker.read_text())
        if not isinstance(data, dict) or not isinstance(data["dims"], dict):
            raise TypeError("not a marker object")
        return data
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CaptureError(
            f"{marker} is unreadable ({type(exc).__name__}: {exc}); rebuild it with "
            f"'attnstore make-tiny-policy {Path(path)}'"
        ) from exc


def tiny_policy_type(path: str | os.PathLike[str]) -> str:
    """The policy type of a tiny checkpoint (markers before Pi0 and SmolVLA are Pi0.5's)."""
    return str(read_marker(path).get("policy_type", "pi05"))


def read_tiny_dims(path: str | os.PathLike[str]) -> Any:
    """The dims recorded in a tiny checkpoint's marker file (:class:`TinyDims` for Pi0.5 and Pi0,
    :class:`~attnstore.capture.tiny_smolvla.TinySmolDims` for SmolVLA)."""
    data = read_marker(path)
    if data.get("policy_type") == "smolvla":
        from attnstore.capture.tiny_smolvla import TinySmolDims

        return TinySmolDims.from_dict(data["dims"])
    return TinyDims.from_dict(data["dims"])


def tiny_depths(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(action-expert depth, VLM depth) of a tiny checkpoint."""
    depth = int(read_tiny_dims(path).depth)
    return depth, depth


def tokenizer_dir(path: str | os.PathLike[str]) -> Path:
    """Where a tiny checkpoint keeps its tokenizer (``tokenizer/``; SmolVLA: its tiny VLM's folder ``vlm/``)."""
    try:
        name = read_marker(path).get("tokenizer_dir", TOKENIZER_DIRNAME)
    except CaptureError:
        name = TOKENIZER_DIRNAME
    return Path(path) / str(name)
