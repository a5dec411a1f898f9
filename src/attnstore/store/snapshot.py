"""The store's reader snapshot: consolidated metadata in the root ``zarr.json``, rewritten after every commit.

Zarr keeps each array's shape in its own ``zarr.json``, so a run killed between the resizes of one append
leaves arrays of different lengths, which plain ``xr.open_zarr`` refuses ("conflicting sizes"). Readers
that use consolidated metadata (``xr.open_zarr``'s default, ``zarr.open_group``'s default, and
``open_attention``) read every array's shape from the root ``zarr.json`` instead. The writer rewrites it
once per commit, after the data and the commit marker, in one atomic file replace: every reader sees the
shapes of the last finished commit, all equal, whatever moment a kill hit.

The snapshot is kept in memory (shapes change, nothing else does), so a commit costs one small JSON write.

A full disk must not leave a store ``writing`` for ever: while the writer runs, a reserve file
(:data:`RESERVE`, a few times the root metadata's size) holds space in the store's folder, and :meth:`Snapshot.finish`
deletes it before the last write, so the final status (``interrupted`` with the reason) fits even when the run
filled the disk to the last byte. A killed run leaves it behind; the next writer of the store rewrites it and the
next finish removes it; readers never look at it.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from attnstore.schema import ROOT_ATTR

ROOT_META = "zarr.json"
RESERVE = ".attnstore-reserve"  # space for the final status write (see the module docstring)
RESERVE_MIN_BYTES = 256 * 1024


def consolidate(target: Any) -> None:
    """Write consolidated metadata of the whole store (a local path or a zarr Store) as zarr does."""
    import zarr

    with warnings.catch_warnings():  # "consolidated metadata is not in the v3 spec": xarray and zarr read it
        warnings.simplefilter("ignore", category=UserWarning)
        zarr.consolidate_metadata(str(target) if isinstance(target, Path) else target)


class Snapshot:
    """The root metadata of a store with consolidated array metadata, updated in place per commit."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        consolidate(self.path)
        self._root: dict[str, Any] = json.loads((self.path / ROOT_META).read_text())
        self._arrays: dict[str, Any] = self._root["consolidated_metadata"]["metadata"]
        reserve_bytes(self.path / RESERVE, max(RESERVE_MIN_BYTES, 4 * len(self._dumps())))

    def commit(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Record the arrays' new shapes and replace the root ``zarr.json`` atomically. When the write fails
        (a full disk) the snapshot keeps the previous shapes: what readers saw last, and what the writer's
        error message counts, is what :meth:`finish` writes."""
        before = {name: self._arrays[name]["shape"] for name in shapes}
        for name, shape in shapes.items():
            self._arrays[name]["shape"] = list(shape)
        try:
            self._write()
        except BaseException:
            for name, shape in before.items():
                self._arrays[name]["shape"] = shape
            raise

    def finish(self, status: str, reason: str | None = None) -> None:
        """The store's final status (``closed``, ``interrupted``) and why (``status_reason``, when given),
        in the same one atomic write."""
        attrs = self._root["attributes"][ROOT_ATTR]
        attrs["status"] = status
        if reason is None:
            attrs.pop("status_reason", None)
        else:
            attrs["status_reason"] = str(reason)
        (self.path / RESERVE).unlink(missing_ok=True)  # its space is what this write needs on a full disk
        self._write()

    def _dumps(self) -> str:
        return json.dumps(self._root, separators=(",", ":"))

    def _write(self) -> None:
        tmp = self.path / f".{ROOT_META}.{os.getpid()}.tmp"
        try:
            tmp.write_text(self._dumps())
            os.replace(tmp, self.path / ROOT_META)
        except OSError:
            tmp.unlink(missing_ok=True)  # a full disk: no half-written leftover (the last snapshot stays valid)
            raise


def reserve_bytes(file: Path, size: int) -> None:
    """Hold ``size`` bytes of disk in ``file`` (written, not sparse: a sparse file would reserve nothing)."""
    with open(file, "wb") as f:
        f.write(b"\0" * size)
        f.flush()
        os.fsync(f.fileno())
