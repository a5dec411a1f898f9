"""Creating, opening and finishing a store on disk (the writer's file-level side).

``preflight`` refuses a bad path or mode before anything runs; ``open_for_writing`` takes the
writer lock and creates every array of the schema beside the final path, then renames it into place
(or reopens a store to append to it). The writer's commits and its final status go through
:mod:`attnstore.store.snapshot`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np

from attnstore import schema as S
from attnstore.errors import StoreError
from attnstore.schema import StoreSpec
from attnstore.store.lock import acquire_lock, refuse_if_locked, release_lock
from attnstore.store.snapshot import consolidate

WriteMode = Literal["create", "overwrite", "append"]


def preflight(path: Path, mode: WriteMode) -> None:
    """Refuse a bad path/mode before anything runs (nothing is written here)."""
    if mode not in ("create", "overwrite", "append"):
        raise StoreError(f"unknown write mode '{mode}': use create, overwrite or append")
    exists = non_empty(path)
    if mode == "append" and not exists:
        raise StoreError(f"cannot append: {path} does not exist (use mode 'create')")
    if mode == "create" and exists:
        raise StoreError(f"{path} already exists: choose a fresh path, or overwrite it (--overwrite on the CLI)")
    if mode != "create" and exists:
        open_existing(path)  # never append to or delete anything that is not an attnstore store
        refuse_if_locked(path)  # nor one another writer is writing
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise StoreError(f"cannot write {path}: {parent} is not writable")


def non_empty(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def open_for_writing(path: Path, spec: StoreSpec, run: Mapping[str, Any] | None, mode: WriteMode):
    preflight(path, mode)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        acquire_lock(path)  # before anything is touched (or deleted): one writer per store
    except OSError as exc:
        raise StoreError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        return _prepare_store(path, spec, run, mode)
    except BaseException:
        release_lock(path)
        raise


def _prepare_store(path: Path, spec: StoreSpec, run: Mapping[str, Any] | None, mode: WriteMode):
    import zarr

    exists = non_empty(path)
    if mode == "create" and exists:  # appeared since the preflight
        raise StoreError(f"{path} already exists: choose a fresh path, or overwrite it (--overwrite on the CLI)")
    _remove_leftovers(path)  # we hold the lock: whoever made them is gone
    if mode == "append":
        group = open_existing(path)
        stored, _ = S.read_root_attrs(group.attrs, str(path))
        if stored != spec:
            raise StoreError(
                f"cannot append to {path}: it was written with another capture spec "
                f"(layers {stored.layers}, denoise {stored.denoise_steps}, encoding {stored.encoding}); "
                f"write to a new store instead"
            )
        group = zarr.open_group(str(path), mode="r+", use_consolidated=False)
        info = dict(group.attrs[S.ROOT_ATTR])
        info["status"] = "writing"
        group.attrs[S.ROOT_ATTR] = info
        return group
    # Built beside its final path and renamed into place: a kill during creation leaves nothing at
    # `path` (only a hidden leftover that the next writer removes), never a half-made store.
    building = _sibling(path, "creating")
    try:
        group = zarr.open_group(str(building), mode="w-", zarr_format=3)
        group.attrs.update(S.root_attrs(spec, run, status="writing"))
        _create_arrays(group, spec)
        consolidate(building)
        if exists:  # mode == "overwrite", and the preflight checked it is an attnstore store
            replaced = _sibling(path, "replaced")
            os.replace(path, replaced)
            os.replace(building, path)
            shutil.rmtree(replaced)
        else:
            os.replace(building, path)
    except OSError as exc:
        shutil.rmtree(building, ignore_errors=True)
        raise StoreError(f"cannot create {path}: {exc.strerror or exc}") from exc
    return zarr.open_group(str(path), mode="r+", use_consolidated=False)


def _sibling(path: Path, what: str) -> Path:
    return path.with_name(f".{path.name}.{what}-{os.getpid()}")


def _remove_leftovers(path: Path) -> None:
    """Hidden siblings of a killed writer's creation or overwrite (``.NAME.creating-PID``)."""
    for what in ("creating", "replaced"):
        for leftover in path.parent.glob(f".{path.name}.{what}-*"):
            shutil.rmtree(leftover, ignore_errors=True)


def open_existing(path: Path):
    """Open an existing attnstore store or raise a one-line StoreError / SchemaError."""
    import zarr

    if not (path / "zarr.json").is_file():
        raise StoreError(f"{path} exists but is not a zarr v3 store (no zarr.json); refusing to touch it")
    try:
        group = zarr.open_group(str(path), mode="r", use_consolidated=False)
    except Exception as exc:
        raise StoreError(f"{path} is not a readable zarr group: {exc}") from exc
    S.read_root_attrs(group.attrs, str(path))
    return group


def _create_arrays(group, spec: StoreSpec) -> None:
    """Every array of the variable table this spec stores: coordinates with their values, growing
    arrays empty with ``chunk_rows`` rows per chunk."""
    for var in S.stored_variables(spec):
        if var.role == "coord":
            values = np.asarray(var.values(spec))
            shape, chunks = values.shape, values.shape
        else:
            row = var.row_shape(spec)
            shape = (0, *row)
            chunks = (var.chunk_rows, *row)
        if var.attention_codec:  # the encoding may store another dtype (uint16 for p in [0, 1])
            codecs = dict(S.attention_codecs(spec.encoding))
        else:
            codecs = {"compressors": S.default_compressors(1 if var.dtype is str else np.dtype(var.dtype).itemsize)}
        dtype = codecs.pop("dtype", var.dtype)
        arr = group.create_array(
            var.name,
            shape=shape,
            chunks=chunks,
            dtype=dtype,
            fill_value=var.fill,
            dimension_names=list(var.dims),
            config={"write_empty_chunks": True},  # every chunk exists: an absent one is damage (integrity.py)
            **codecs,
        )
        attrs = dict(var.attrs)
        if var.attention_codec:
            attrs["encoding"] = spec.encoding
        if var.coordinates:
            attrs["coordinates"] = var.coordinates
        if attrs:
            arr.attrs.update(attrs)
        if var.role == "coord":
            arr[...] = values
