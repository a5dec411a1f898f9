"""``layers=`` and ``source=`` of the region analyses: pick layers, from the full maps or the per-layer summaries.

``source``: ``"attention"`` (the full maps), ``"summary"`` (the per-layer summaries of
:mod:`attnstore.capture.summary`: every expert layer, float16) or ``"auto"`` (the full maps when they hold
the asked-for layers, else the summaries); see :mod:`attnstore.readers.regions`. The summary variables are
read back with the full maps' dims and coordinates (``layer``, ``patch_row``, ``patch_col``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr

from attnstore import schema as S
from attnstore.errors import SelectionError
from attnstore.readers.aggregate import aggregate, reduce_dim
from attnstore.schema import variables as V

SOURCES = ("auto", "attention", "summary")


def use_summary(ds_or_da: Any, layers: Any, source: str) -> bool:
    """Whether to read the summaries: ``source`` as asked, or ``auto`` = when the full maps lack a layer."""
    if source not in SOURCES:
        raise SelectionError(f"source={source!r}: use one of {SOURCES}")
    has_summary = isinstance(ds_or_da, xr.Dataset) and V.SUMMARY_REGION_MASS in ds_or_da
    if source == "summary":
        if not has_summary:
            raise SelectionError(
                "this store has no per-layer summaries (written before them, or with summary=False): "
                "pass source='attention'"
            )
        return True
    if source == "attention" or not has_summary:
        return False
    if S.ATTENTION not in ds_or_da:
        return True
    wanted = wanted_labels(layers)
    if wanted is None:
        return False
    stored = _labels_of(ds_or_da, S.LAYER)
    if stored is None or all(v in stored for v in wanted):
        return False
    summarised = _labels_of(ds_or_da, V.SUMMARY_LAYER) or []
    missing = [v for v in wanted if v not in summarised]
    if missing:
        raise SelectionError(
            f"layer {missing} is neither stored in full (layers {stored}) nor summarised (layers {summarised})"
        )
    return True


def wanted_labels(layers: Any) -> list[int] | None:
    """The layer labels a ``layers=`` selection names (None: all, or a slice: decided by the data).

    >>> wanted_labels(17), wanted_labels([16, 17]), wanted_labels(None), wanted_labels(slice(0, 4))
    ([17], [16, 17], None, None)
    """
    if layers is None or isinstance(layers, slice):
        return None
    if isinstance(layers, (int, np.integer)):
        return [int(layers)]
    return [int(v) for v in layers]


def _labels_of(ds: xr.Dataset, dim: str) -> list[int] | None:
    if dim in ds.coords:
        return [int(v) for v in np.atleast_1d(ds[dim].values)]
    return None


def select_layers(da: xr.DataArray, dim: str, layers: Any) -> xr.DataArray:
    """``layers=``: None keep all; an int label: that layer (dim dropped); a list or slice: those layers."""
    if layers is None:
        return da
    if dim not in da.dims:
        raise SelectionError(f"cannot select layers={layers!r}: the array has no '{dim}' dim (already selected?)")
    if isinstance(layers, (int, np.integer)) and not isinstance(layers, bool):
        return reduce_dim(da, dim, int(layers), arg="layers")
    labels = [int(v) for v in da[dim].values]
    if isinstance(layers, slice):
        picked = da.sel({dim: layers})
    else:
        wanted = wanted_labels(layers)
        missing = [v for v in wanted if v not in labels]
        if missing or not wanted:
            raise SelectionError(f"layers {missing or wanted} not available; this array has layers {labels}")
        picked = da.sel({dim: wanted})
    if picked.sizes[dim] == 0:
        raise SelectionError(f"layers={layers} selects nothing; this array has layers {labels}")
    return picked


def summary_var(ds: xr.Dataset, name: str, layers: Any) -> xr.DataArray:
    """A summary variable as float32 with its ``summary_layer`` dim named ``layer``, layers selected."""
    if name not in ds:
        raise SelectionError(f"the dataset has no '{name}' (per-layer summaries): pass source='attention'")
    da = ds[name]
    da = da.astype(np.float32) if da.dtype != np.float32 else da
    if V.SUMMARY_LAYER in da.dims or V.SUMMARY_LAYER in da.coords:
        da = da.rename({V.SUMMARY_LAYER: S.LAYER})
    return select_layers(da, S.LAYER, layers)


def summary_grid(ds: xr.Dataset, camera: str, layers: Any) -> tuple[xr.DataArray, xr.DataArray]:
    """(grid of ``camera`` from the summaries, total attention of the same rows) -- both head-and-token means."""
    from attnstore.store.open import spec_of

    layout = spec_of(ds).layout
    absent = tuple(c for c, present in zip(layout.cameras, layout.camera_present) if not present)
    present = [c for c in layout.cameras if c not in absent]
    if camera not in layout.cameras:
        raise SelectionError(f"camera '{camera}' is not in this store; its cameras are {present}")
    if camera in absent:
        raise SelectionError(
            f"camera '{camera}' was not in the policy's input (a masked placeholder slot, attention 0 by "
            f"construction); choose one of {present}"
        )
    grids = summary_var(ds, V.SUMMARY_GRID, layers)
    grid = grids.sel({S.CAMERA: camera}).drop_vars(S.CAMERA)
    grid = grid.rename({V.GRID_ROW: S.PATCH_ROW, V.GRID_COL: S.PATCH_COL})
    grid = grid.assign_coords({S.PATCH_ROW: np.arange(grid.sizes[S.PATCH_ROW]),
                               S.PATCH_COL: np.arange(grid.sizes[S.PATCH_COL])})
    mass = summary_var(ds, V.SUMMARY_REGION_MASS, layers)
    total = aggregate(mass, heads="mean", queries="mean").sum(S.REGION)
    return grid, total
