"""open_attention: a thin, documented layer over ``xr.open_zarr`` for attention stores.

What it adds to plain ``xr.open_zarr``: it validates the schema version, hides rows that were never
committed (a killed run), indexes the inference axis by ``(episode, rollout)`` so that
``ds.attention.sel(episode=e, rollout=r, denoise=d, layer=l)`` works, and opens stores whose arrays
were left at different lengths by a kill mid-append. Everything stays lazy (dask).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from attnstore import schema as S
from attnstore.errors import StoreError
from attnstore.schema import StoreSpec

SPEC_ATTR = "attnstore_spec"  # ds.attrs key holding the StoreSpec dict
RUN_ATTR = "attnstore_run"  # ds.attrs key holding the run info (policy, task, lerobot version, ...)
STATUS_ATTR = "attnstore_status"  # "writing" (or killed), "closed", "interrupted"


def open_attention(path: str | os.PathLike[str], *, chunks: Any = None) -> xr.Dataset:
    """Open an attention store lazily, committed rows only, indexed by (episode, rollout).

    ``chunks`` is passed to ``xr.open_zarr`` (default: the store's chunks, one inference per chunk).

    Example::

        ds = open_attention("outputs/eval/attention.zarr")
        ds.attention.sel(episode=0, rollout=3, denoise=9, layer=17)   # (head, query, key), lazy
        action_to_visual(ds, camera="image")                          # (..., patch_row, patch_col)
    """
    path = Path(path)
    spec, info = read_spec(path)
    consolidated = _has_consolidated_metadata(path)
    if not consolidated and not _even_lengths(path):
        # a store of an older attnstore killed mid-append (newer ones keep a consistent snapshot)
        ds = _open_uneven(path, chunks)
    else:
        try:
            # chunks=None would give non-dask lazy arrays that cache whole variables once touched;
            # {} keeps dask on the store's own chunks (one inference per chunk).
            ds = xr.open_zarr(path, consolidated=consolidated, chunks={} if chunks is None else chunks, zarr_format=3)
        except ValueError as exc:
            raise StoreError(f"cannot open {path}: {exc}") from exc
    ds = committed_rows(ds)
    small = [c for c in (S.ENV_STEP, S.TIME, *S.KEY_COORDS) if c in ds.coords]
    ds = ds.assign_coords({c: ds[c].load() for c in small})  # tiny; eager so .where/.sel on them is cheap
    ds = ds.set_xindex([S.EPISODE, S.ROLLOUT])
    ds.attrs = {SPEC_ATTR: spec.to_dict(), RUN_ATTR: info.get("run", {}), STATUS_ATTR: info.get("status")}
    return ds


def read_spec(path: str | os.PathLike[str]) -> tuple[StoreSpec, dict[str, Any]]:
    """The store's :class:`StoreSpec` and root info, or a one-line error saying what ``path`` is."""
    path = Path(path)
    if not path.exists():
        raise StoreError(f"{path} does not exist: pass the attention.zarr folder an evaluation wrote")
    meta = path / "zarr.json"
    if not path.is_dir() or not meta.is_file():
        raise StoreError(f"{path} is not a zarr v3 store (no zarr.json): pass an attention.zarr folder")
    try:
        root = json.loads(meta.read_text())
    except (OSError, ValueError) as exc:
        raise StoreError(f"{meta} is unreadable ({exc}): the store is damaged") from exc
    if root.get("node_type") != "group":
        raise StoreError(f"{path} is a zarr array, not an attnstore group store")
    return S.read_root_attrs(root.get("attributes", {}), str(path))


def spec_of(ds: xr.Dataset) -> StoreSpec:
    """The StoreSpec of a dataset returned by :func:`open_attention`."""
    try:
        return StoreSpec.from_dict(ds.attrs[SPEC_ATTR])
    except KeyError:
        raise StoreError("dataset has no attnstore spec: open it with attnstore.open_attention") from None


def committed_rows(ds: xr.Dataset) -> xr.Dataset:
    """Drop inference rows and episode records whose commit marker was never written."""
    episode = np.asarray(ds[S.EPISODE].values)
    ds = ds.isel({S.INFERENCE: np.flatnonzero(episode != S.UNCOMMITTED)})
    if S.EPISODE_INDEX in ds.dims:
        marker = np.asarray(ds[S.EPISODE_INDEX].values)
        ds = ds.isel({S.EPISODE_INDEX: np.flatnonzero(marker != S.UNCOMMITTED)})
    return ds


def episode_table(ds) -> dict[int, dict[str, Any]]:
    """Per-episode table rows by episode index (the last row wins if an episode repeats)."""
    if S.EPISODE_INDEX not in ds.dims:
        return {}
    index = np.asarray(ds[S.EPISODE_INDEX].values).tolist()
    columns = {name: np.asarray(ds[name].values).tolist() for name in S.EPISODE_VARS if name in ds}
    return {int(ep): {name: col[i] for name, col in columns.items()} for i, ep in enumerate(index)}


def _has_consolidated_metadata(path: Path) -> bool:
    try:
        return bool(json.loads((path / "zarr.json").read_text()).get("consolidated_metadata"))
    except (OSError, ValueError):
        return False


def _growing_lengths(group) -> dict[str, set[int]]:
    """Lengths each growing axis (inference, episode_index) has across the group's arrays."""
    lengths: dict[str, set[int]] = {}
    for _, arr in group.arrays():
        for dim, size in zip(arr.metadata.dimension_names or (), arr.shape):
            if dim in (S.INFERENCE, S.EPISODE_INDEX):
                lengths.setdefault(dim, set()).add(int(size))
    return lengths


def _even_lengths(path: Path) -> bool:
    import zarr

    group = zarr.open_group(str(path), mode="r", use_consolidated=False)
    return all(len(sizes) == 1 for sizes in _growing_lengths(group).values())


def _open_uneven(path: Path, chunks: Any) -> xr.Dataset:
    """Open a store left mid-append: cut every array of a growing axis to the shortest one."""
    import dask.array as da
    import zarr

    group = zarr.open_group(str(path), mode="r", use_consolidated=False)
    arrays = dict(group.arrays())
    dims = {name: tuple(arr.metadata.dimension_names) for name, arr in arrays.items()}
    lengths = {dim: min(sizes) for dim, sizes in _growing_lengths(group).items()}
    variables = {}
    coord_names: set[str] = set()
    for name, arr in arrays.items():
        index = tuple(slice(0, lengths[d]) if d in lengths else slice(None) for d in dims[name])
        data = da.from_zarr(arr, chunks=_dask_chunks(dims[name], arr.chunks, chunks))[index]
        variables[name] = xr.Variable(dims[name], data, attrs=dict(arr.attrs))
        coord_names.update(str(arr.attrs.get("coordinates", "")).split())
    for var in variables.values():
        var.attrs.pop("coordinates", None)
    ds = xr.Dataset(variables)
    return ds.set_coords([c for c in coord_names | set(ds.dims) if c in ds.variables])


def _dask_chunks(dims: tuple[str, ...], store_chunks: tuple[int, ...], chunks: Any) -> Any:
    """Dask chunks of one array: the store's own, overridden per dimension name by a ``chunks`` dict.

    >>> _dask_chunks(("inference", "key"), (1, 59), {"inference": 4})
    (4, 59)
    >>> _dask_chunks(("inference", "key"), (1, 59), None)
    (1, 59)
    """
    if chunks is None:
        return tuple(store_chunks)
    if isinstance(chunks, dict):
        return tuple(chunks.get(d, c) for d, c in zip(dims, store_chunks))
    return chunks  # "auto", an int, ...: dask's own meaning
