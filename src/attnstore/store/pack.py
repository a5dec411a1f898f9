"""``attnstore pack SRC DEST``: rewrite a finished store with Zarr v3 sharding, for archive and upload.

A store being written keeps one chunk (one object, one file) per inference and variable, so that nothing is
ever rewritten; that is ~6 objects per inference, slow to upload and list on object storage. ``pack``
copies every array into shards of many rows (inner chunks unchanged, so a reader still fetches one
inference with one range request), through the arrays' own codecs: the stored integers are identical and
readers open both layouts the same way. The destination gets its ``attnstore`` root attrs (what makes it a
store) last, so a pack killed half-way is refused by readers in one line and can simply be run again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from attnstore import schema as S
from attnstore.errors import StoreError
from attnstore.store.location import Location, Source, describe_failure, locate
from attnstore.store.open import read_spec
from attnstore.store.snapshot import consolidate

MAX_SHARD_BYTES = 512 * 2**20  # raw bytes of one shard of the largest per-inference array, beyond the minimum
MAX_ROWS_PER_SHARD = 4096


@dataclass
class PackResult:
    rows: int
    arrays: int
    rows_per_shard: int
    objects_before: int | None
    objects_after: int | None


def rows_per_shard(row_bytes: int, n_row_arrays: int, objects_per_inference: float = 0.1) -> int:
    """Rows per shard: enough that every per-inference array together makes at most ``objects_per_inference``
    objects per row, and otherwise shards of about ``MAX_SHARD_BYTES``.

    >>> rows_per_shard(row_bytes=32_000_000, n_row_arrays=6)      # full attention rows: the object bound
    60
    >>> rows_per_shard(row_bytes=20_000, n_row_arrays=6)          # small rows: 512 MB shards, capped
    4096
    """
    minimum = int(np.ceil(n_row_arrays / objects_per_inference))
    by_size = MAX_SHARD_BYTES // max(int(row_bytes), 1)
    return int(min(MAX_ROWS_PER_SHARD, max(minimum, by_size)))


def pack(
    source: Source,
    dest: Source,
    *,
    storage_options: Mapping[str, Any] | None = None,
    dest_storage_options: Mapping[str, Any] | None = None,
    rows: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> PackResult:
    """Copy ``source`` to ``dest`` with sharded per-inference arrays (see the module doc)."""
    import zarr
    from tqdm.auto import tqdm

    src = locate(source, storage_options)
    dst = locate(dest, dest_storage_options if dest_storage_options is not None else storage_options)
    spec, info = read_spec(src)
    if info.get("status") == "writing":
        raise StoreError(
            f"{src.name} is still being written (or was killed while writing): pack a finished store "
            f"(status closed or interrupted); 'attnstore inspect' shows its status"
        )
    _check_dest(dst, overwrite)
    try:
        group = zarr.open_group(src.store().arm(), mode="r")  # armed: a missing committed chunk is an error
        arrays = dict(group.arrays())
        row_arrays = [a for a in arrays.values() if _per_inference(a)]
        row_bytes = max((int(np.prod(a.shape[1:])) * a.dtype.itemsize for a in row_arrays), default=1)
        n_rows = int(arrays[S.EPISODE].shape[0])
        shard_rows = rows or rows_per_shard(row_bytes, len(row_arrays))
        objects_before = _count_objects(src)
        out = zarr.open_group(dst.store(read_only=False), mode="w", zarr_format=3,
                              attributes={"attnstore_pack": {"from": src.name, "state": "in progress"}})
        bar = tqdm(total=n_rows * len(row_arrays), desc=f"pack {dst.name}", unit="row", disable=not progress)
        for name, arr in arrays.items():
            _copy_array(out, name, arr, shard_rows if _per_inference(arr) else None, bar.update)
        bar.close()
        out.attrs.put({S.ROOT_ATTR: {**info, "packed_from": src.name, "rows_per_shard": shard_rows}})
        consolidate(dst.path if dst.is_local else dst.store(read_only=False))
    except StoreError:
        raise
    except OSError as exc:
        raise StoreError(describe_failure(dst, exc)) from exc
    return PackResult(n_rows, len(arrays), shard_rows, objects_before, _count_objects(dst))


def _per_inference(arr) -> bool:
    dims = arr.metadata.dimension_names or ()
    return bool(dims) and dims[0] == S.INFERENCE and arr.chunks[0] == 1


def _copy_array(out, name: str, arr, shard_rows: int | None, advance: Callable[[int], None]) -> None:
    """Same dtype, fill, codecs, dims and attrs; sharded along ``inference`` when ``shard_rows`` is given."""
    meta = arr.metadata
    shards = None if shard_rows is None else (shard_rows, *arr.shape[1:])
    new = out.create_array(
        name, shape=arr.shape, dtype=arr.dtype if arr.dtype.kind not in "OTU" else str,
        chunks=arr.chunks, shards=shards, filters=arr.filters, serializer=arr.serializer,
        compressors=arr.compressors, fill_value=meta.fill_value, dimension_names=meta.dimension_names,
        attributes=dict(arr.attrs), config={"write_empty_chunks": True},  # absent = damaged (integrity.py)
    )
    n = arr.shape[0] if arr.ndim else 0
    step = shard_rows or max(n, 1)
    if arr.ndim == 0 or n == 0:
        if arr.ndim == 0:
            new[...] = arr[...]
        return
    for start in range(0, n, step):  # one shard per write: each shard object is written once, whole
        stop = min(start + step, n)
        new[start:stop] = arr[start:stop]
        if shard_rows is not None:
            advance(stop - start)


def _check_dest(dst: Location, overwrite: bool) -> None:
    if dst.is_local:
        if dst.path.exists() and any(dst.path.iterdir()) if dst.path.is_dir() else dst.path.exists():
            if not overwrite:
                raise StoreError(f"{dst.name} already exists: choose a new destination or pass --overwrite")
            if not (dst.path / "zarr.json").is_file():
                raise StoreError(f"{dst.name} exists and is not a zarr store; refusing to overwrite it")
        return
    if dst.exists() and not overwrite:
        raise StoreError(f"{dst.name} already exists: choose a new destination or pass --overwrite")


def _count_objects(loc: Location) -> int | None:
    """Number of objects (files) the store is made of."""
    if loc.is_local:
        return sum(1 for f in loc.path.rglob("*") if f.is_file())
    try:
        import fsspec

        protocol = loc.url.split("://", 1)[0]
        fs = fsspec.filesystem(protocol, **dict(loc.storage_options))
        return len(fs.find(loc.url))
    except Exception:  # counting is a report, never a failure
        return None
