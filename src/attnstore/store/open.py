"""open_attention: a thin, documented layer over ``xr.open_zarr`` for attention stores.

What it adds to plain ``xr.open_zarr``: it validates the schema version, hides rows that were never
committed (a killed run), indexes the inference axis by ``(episode, rollout)`` so that
``ds.attention.sel(episode=e, rollout=r, denoise=d, layer=l)`` works, and opens stores whose arrays
were left at different lengths by a kill mid-append. Everything stays lazy (dask).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from attnstore import schema as S
from attnstore.errors import StoreError
from attnstore.schema import StoreSpec
from attnstore.store import codecs as _codecs  # noqa: F401 - registers the compact encoding's zarr codec
from attnstore.store.location import Location, Source, describe_failure, locate

SPEC_ATTR = "attnstore_spec"  # ds.attrs key holding the StoreSpec dict
RUN_ATTR = "attnstore_run"  # ds.attrs key holding the run info (policy, task, lerobot version, ...)
STATUS_ATTR = "attnstore_status"  # "writing" (or killed), "closed", "interrupted"
STATUS_REASON_ATTR = "attnstore_status_reason"  # why (interrupted: the error), only when the writer gave one
_ATTENTION_VARS = tuple(v.name for v in S.VARIABLES if v.attention_codec)  # attention, prefix_attention


def open_attention(
    source: Source, *, chunks: Any = None, storage_options: Mapping[str, Any] | None = None
) -> xr.Dataset:
    """Open an attention store lazily, committed rows only, indexed by (episode, rollout).

    ``source``: a local path, an fsspec URL (``s3://bucket/run/attention.zarr``, ``gs://``, ``memory://``,
    ``file://``) with ``storage_options`` as xarray/fsspec take them, or a zarr Store object.
    ``chunks`` is passed to ``xr.open_zarr`` (default: the store's chunks, one inference per chunk).

    Example::

        ds = open_attention("outputs/eval/attention.zarr")
        ds.attention.sel(episode=0, rollout=3, denoise=9, layer=17)   # (head, query, key), lazy
        action_to_visual(ds, camera="image")                          # (..., patch_row, patch_col)
        open_attention("s3://lab/study/runs/task0/attention.zarr", storage_options={"endpoint_url": url})
    """
    loc = locate(source, storage_options)
    spec, info, root = _read_root(loc)
    consolidated = bool(root.get("consolidated_metadata"))
    store = loc.store()  # a CheckedStore: damaged chunks of committed rows raise StoreDamagedError
    try:
        store.arm(consolidated)  # the commit markers: which absent chunks are a killed run's tail
        if not consolidated and not _even_lengths(store):
            # a store of an older attnstore killed mid-append (newer ones keep a consistent snapshot)
            ds = _open_uneven(store, chunks)
        else:
            # chunks=None would give non-dask lazy arrays that cache whole variables once touched;
            # {} keeps dask on the store's own chunks (one inference per chunk).
            ds = xr.open_zarr(store, consolidated=consolidated, chunks={} if chunks is None else chunks,
                              zarr_format=3, mask_and_scale={name: False for name in _ATTENTION_VARS})
    except (ValueError, KeyError) as exc:
        raise StoreError(f"cannot open {loc.name}: {exc}") from exc
    except OSError as exc:
        raise StoreError(describe_failure(loc, exc)) from exc
    ds = committed_rows(decode_attention(ds))
    small = [c for c in (S.ENV_STEP, S.TIME, *S.KEY_COORDS) if c in ds.coords]
    ds = ds.assign_coords({c: ds[c].load() for c in small})  # tiny; eager so .where/.sel on them is cheap
    ds = ds.set_xindex([S.EPISODE, S.ROLLOUT])
    ds.attrs = {SPEC_ATTR: spec.to_dict(), RUN_ATTR: info.get("run", {}), STATUS_ATTR: info.get("status")}
    if info.get("status_reason"):
        ds.attrs[STATUS_REASON_ATTR] = info["status_reason"]
    return ds


def read_spec(source: Source, storage_options: Mapping[str, Any] | None = None) -> tuple[StoreSpec, dict[str, Any]]:
    """The store's :class:`StoreSpec` and root info, or a one-line error saying what ``source`` is."""
    spec, info, _ = _read_root(locate(source, storage_options))
    return spec, info


def _read_root(loc: Location) -> tuple[StoreSpec, dict[str, Any], dict[str, Any]]:
    """Spec, root info and the root ``zarr.json`` (the one place that reads it)."""
    if loc.is_local and not loc.path.exists():
        raise StoreError(f"{loc.name} does not exist: pass the attention.zarr folder an evaluation wrote")
    root = loc.read_json("zarr.json")
    if root is None:
        if loc.is_local:
            raise StoreError(f"{loc.name} is not a zarr v3 store (no zarr.json): pass an attention.zarr folder")
        raise StoreError(f"{loc.name} does not exist (no zarr.json there): check the URL")
    if root.get("node_type") != "group":
        raise StoreError(f"{loc.name} is a zarr array, not an attnstore group store")
    spec, info = S.read_root_attrs(root.get("attributes", {}), loc.name)
    return spec, info, root


def spec_of(ds: xr.Dataset) -> StoreSpec:
    """The StoreSpec of a dataset from :func:`open_attention`, or from plain ``xr.open_zarr`` (the store's
    root attrs, ``ds.attrs["attnstore"]``), or of any selection of either that kept its attrs."""
    if SPEC_ATTR in ds.attrs:
        return StoreSpec.from_dict(ds.attrs[SPEC_ATTR])
    if S.ROOT_ATTR in ds.attrs:
        return S.read_root_attrs(ds.attrs, "the dataset")[0]
    raise StoreError(
        "dataset has no attnstore spec: open it with attnstore.open_attention or xr.open_zarr, and keep its attrs"
    )


def decode_attention(ds: xr.Dataset) -> xr.Dataset:
    """Attention stored as CF-scaled integers (schema 2: uint16 k, ``scale_factor`` 1/65535) as float32
    k / 65535, lazily; float32 arrays (the ``float32`` encoding, schema-1 stores) stay as they are."""
    for name in _ATTENTION_VARS:
        var = ds.variables.get(name)
        if var is None or var.dtype.kind not in "iu" or "scale_factor" not in var.attrs:
            continue
        attrs = dict(var.attrs)
        scale, offset = float(attrs.pop("scale_factor")), float(attrs.pop("add_offset", 0.0))
        inverse = round(1.0 / scale)
        if offset == 0.0 and abs(inverse * scale - 1.0) < 1e-12:
            data = var.data.astype(np.float32) / np.float32(inverse)  # correctly rounded k / 65535
        else:
            data = var.data.astype(np.float32) * np.float32(scale) + np.float32(offset)
        ds[name] = xr.Variable(var.dims, data, attrs)
    return ds


def committed_rows(ds: xr.Dataset) -> xr.Dataset:
    """Drop inference rows and episode records whose commit marker was never written."""
    ds = _keep(ds, S.INFERENCE, np.asarray(ds[S.EPISODE].values) != S.UNCOMMITTED)
    if S.EPISODE_INDEX in ds.dims:
        ds = _keep(ds, S.EPISODE_INDEX, np.asarray(ds[S.EPISODE_INDEX].values) != S.UNCOMMITTED)
    return ds


def _keep(ds: xr.Dataset, dim: str, mask: np.ndarray) -> xr.Dataset:
    """``ds`` at the rows where ``mask``: slices of the committed runs (cheap for dask), not a fancy index."""
    runs = contiguous_runs(mask)
    if len(runs) == 1:
        return ds.isel({dim: runs[0]})
    if 1 < len(runs) <= 16:  # e.g. a resumed store: its killed run's uncommitted tail sits in between
        return xr.concat([ds.isel({dim: r}) for r in runs], dim=dim, data_vars="minimal", coords="minimal",
                         compat="override", join="override", combine_attrs="override")
    return ds.isel({dim: np.flatnonzero(mask)})


def contiguous_runs(mask: np.ndarray) -> list[slice]:
    """The True runs of a boolean mask as slices (one empty slice when there are none).

    >>> contiguous_runs(np.array([True, True, False, True]))
    [slice(0, 2, None), slice(3, 4, None)]
    >>> contiguous_runs(np.array([False])), contiguous_runs(np.array([True, True]))
    ([slice(0, 0, None)], [slice(0, 2, None)])
    """
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    starts, stops = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return [slice(int(a), int(b)) for a, b in zip(starts, stops)] or [slice(0, 0)]


def episode_table(ds) -> dict[int, dict[str, Any]]:
    """Per-episode table rows by episode index (the last row wins if an episode repeats)."""
    if S.EPISODE_INDEX not in ds.dims:
        return {}
    index = np.asarray(ds[S.EPISODE_INDEX].values).tolist()
    columns = {name: np.asarray(ds[name].values).tolist() for name in S.EPISODE_VARS if name in ds}
    return {int(ep): {name: col[i] for name, col in columns.items()} for i, ep in enumerate(index)}


def _growing_lengths(group) -> dict[str, set[int]]:
    """Lengths each growing axis (inference, episode_index) has across the group's arrays."""
    lengths: dict[str, set[int]] = {}
    for _, arr in group.arrays():
        for dim, size in zip(arr.metadata.dimension_names or (), arr.shape):
            if dim in (S.INFERENCE, S.EPISODE_INDEX):
                lengths.setdefault(dim, set()).add(int(size))
    return lengths


def _even_lengths(store: Any) -> bool:
    import zarr

    group = zarr.open_group(_zarr_target(store), mode="r", use_consolidated=False)
    return all(len(sizes) == 1 for sizes in _growing_lengths(group).values())


def _zarr_target(store: Any) -> Any:
    return str(store) if isinstance(store, Path) else store


def _open_uneven(store: Any, chunks: Any) -> xr.Dataset:
    """Open a store left mid-append: cut every array of a growing axis to the shortest one."""
    import dask.array as da
    import zarr

    group = zarr.open_group(_zarr_target(store), mode="r", use_consolidated=False)
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
    ds = decode_attention(xr.Dataset(variables))
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
