"""aggregate: reduce or select the head / action-token / layer / denoise dims of attention, lazily.

One rule for every dim (``how``):

* ``None``: keep the dim as it is;
* ``"mean"`` / ``"max"``: reduce over it (a no-op if the dim is already gone, e.g. after ``.sel``);
* an ``int``: select that coordinate label (the layer index 17, not position 1); the dim is dropped;
* a ``slice`` or a list of labels: select those labels, then average over them (``queries=slice(0, 9)``
  = the 10 action tokens the robot executes with ``n_action_steps=10``; label slices include the end).

Selections on a dim the array no longer has, and labels that were not captured, raise a one-line
:class:`~attnstore.errors.SelectionError`. dask-backed input stays dask-backed (nothing is loaded).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import xarray as xr

from attnstore import schema as S
from attnstore.errors import SelectionError

REDUCTIONS = ("mean", "max")


def aggregate(
    da: xr.DataArray | xr.Dataset,
    heads: Any = "mean",
    queries: Any = "mean",
    layers: Any = None,
    denoise: Any = None,
) -> xr.DataArray:
    """Reduce/select the head and action-token dims (and optionally layer and denoise).

    A Dataset (from :func:`attnstore.open_attention`) stands for its ``attention`` variable.

    >>> import numpy as np
    >>> da = xr.DataArray(np.arange(8.0).reshape(2, 2, 2), dims=("head", "query", "key"),
    ...                   coords={"head": [0, 1], "query": [0, 1]})
    >>> aggregate(da).values            # mean over heads, then over action tokens
    array([3., 4.])
    >>> aggregate(da, heads="max", queries=1).values
    array([6., 7.])
    >>> aggregate(da, heads=0, queries=None).values
    array([[0., 1.],
           [2., 3.]])
    """
    if isinstance(da, xr.Dataset):
        da = da[S.ATTENTION]
    for dim, how, arg in ((S.HEAD, heads, "heads"), (S.QUERY, queries, "queries"), (S.LAYER, layers, "layers"),
                          (S.DENOISE, denoise, "denoise")):
        da = reduce_dim(da, dim, how, arg=arg)
    return da


def reduce_dim(da: xr.DataArray, dim: str, how: Any, *, arg: str | None = None) -> xr.DataArray:
    """Apply one ``how`` (see the module docstring) to one dim; ``arg`` names it in error messages.

    >>> import numpy as np
    >>> da = xr.DataArray([[1.0, 3.0], [5.0, 7.0]], dims=("layer", "key"), coords={"layer": [16, 17]})
    >>> reduce_dim(da, "layer", 17).values
    array([5., 7.])
    >>> reduce_dim(da, "layer", [16, 17]).values
    array([3., 5.])
    >>> reduce_dim(da, "layer", 3)
    Traceback (most recent call last):
    ...
    attnstore.errors.SelectionError: layer 3 was not captured; this array has layer [16, 17]
    """
    if how is None:
        return da
    arg = arg or dim
    usage = f"{arg}={how!r}: use one of {REDUCTIONS}, an int label, a slice/list of labels, or None"
    if isinstance(how, str):
        if how not in REDUCTIONS:
            raise SelectionError(usage)
        if dim not in da.dims:
            return da  # already selected or reduced by the caller
        return da.mean(dim) if how == "mean" else da.max(dim)
    if dim not in da.dims:
        raise SelectionError(
            f"cannot select {arg}={how!r}: the array has no '{dim}' dim (already selected?); pass {arg}=None"
        )
    if isinstance(how, (np.integer, np.ndarray)):
        how = how.tolist()  # numpy labels (e.g. from .values) behave like python ones
    if isinstance(how, bool) or not isinstance(how, (int, slice, Sequence)) or isinstance(how, str):
        raise SelectionError(usage)
    labels = _labels(da, dim)
    if isinstance(how, int):
        if how not in labels:
            raise SelectionError(f"{dim} {how} was not captured; this array has {dim} {labels}")
        return _select(da, dim, how)
    if isinstance(how, slice):
        picked = _select(da, dim, how)
        if picked.sizes[dim] == 0:
            raise SelectionError(f"{arg}={how} selects nothing; this array has {dim} {labels}")
        return picked.mean(dim)
    missing = [v for v in how if v not in labels]
    if missing or not len(how):
        raise SelectionError(f"{dim} {missing or list(how)} not captured; this array has {dim} {labels}")
    return _select(da, dim, list(how)).mean(dim)


def _select(da: xr.DataArray, dim: str, labels: Any) -> xr.DataArray:
    return da.sel({dim: labels}) if dim in da.indexes else da.isel({dim: labels})


def _labels(da: xr.DataArray, dim: str) -> list[int]:
    if dim in da.coords:
        return [int(v) for v in da[dim].values]
    return list(range(da.sizes[dim]))  # no coordinate: labels are positions
