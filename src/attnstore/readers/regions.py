"""Where the action tokens look: per-camera patch grids, region shares, entropy, top-k patches.

Every function takes either the Dataset from :func:`attnstore.open_attention` (or a ``.sel``/``.isel``
of it) or an attention DataArray that still has its ``key`` coordinates (``key_region``,
``patch_row``, ``patch_col``), keeps every leading dim the caller kept (inference, denoise, layer,
head, query) and stays lazy: results are dask-backed until ``.compute()``.

Shares are fractions of the (aggregated) row's total attention, so the uint16 encoding's rounding
and a ``"max"`` over heads never make them drift from summing to 1.

Cameras: a name that is not in the token layout is an error that lists the cameras. A camera slot
that is in the layout but was not in the policy's input (Pi0.5's ``empty_camera_0``: masked, so its
attention is 0 by construction) is also an error when a Dataset is given, since an all-zero grid would
read as "the policy ignores this camera"; a bare DataArray carries no presence flags, so it gives the
(zero) grid. :func:`region_shares` lists every slot, so a masked one shows as 0.

Per-layer summaries (``source=``): a store written with summaries (the recorder's default) holds, for
every expert layer, the region mass and entropy of each attention row and the head-and-token-mean camera
grids (:mod:`attnstore.capture.summary`), even for the layers not stored in full. :func:`region_shares`,
:func:`entropy`, :func:`action_to_visual` and :func:`top_k_patches` take ``layers=`` (None: every layer of
the source; an int label: that layer, dim dropped; a list or slice of labels: those layers) and
``source=``: ``"attention"`` (the full maps), ``"summary"`` (the summaries: every layer, float16, relative
error <= 2**-11), or ``"auto"`` (default: the full maps when they hold the asked-for layers, else the
summaries). Results have the same dims and coordinates (``layer``, ``region``, ``patch_row``,
``patch_col``) from either source; the summaries agree with the full maps to float16 precision.

Here: the camera grid, the region shares and the top-k patches; :func:`entropy` is in
:mod:`attnstore.readers.entropies`, the key coordinates in :mod:`attnstore.readers.keys`, ``layers=`` /
``source=`` in :mod:`attnstore.readers.layers` (``camera_keys`` and ``entropy`` importable from here too).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr

from attnstore import schema as S
from attnstore.errors import SelectionError
from attnstore.readers.aggregate import aggregate
from attnstore.readers.entropies import entropy
from attnstore.readers.keys import camera_keys, region_onehot, resolve_input, to_grid
from attnstore.readers.layers import SOURCES, select_layers, summary_grid, summary_var, use_summary
from attnstore.schema import variables as V

__all__ = ["SOURCES", "action_to_visual", "camera_keys", "entropy", "region_shares", "top_k_patches"]


def action_to_visual(
    ds_or_da: xr.Dataset | xr.DataArray,
    camera: str,
    *,
    heads: Any = "mean",
    queries: Any = "mean",
    renormalize: bool = False,
    layers: Any = None,
    source: str = "auto",
) -> xr.DataArray:
    """The action tokens' attention over one camera's patches: dims (..., patch_row, patch_col).

    ``heads``/``queries`` as in :func:`aggregate`. Values are shares of the aggregated row's total
    attention (the grid sums to that camera's :func:`region_shares` entry), or with
    ``renormalize=True`` shares of the camera's own attention (the grid sums to 1). ``layers`` and
    ``source`` as in the module docstring (the summaries hold head-and-token means only).

    >>> from attnstore.schema import TokenLayout
    >>> lay = TokenLayout(("image",), (True,), grid_rows=2, grid_cols=2, num_language=1, num_action=1)
    >>> coords = {k: ("key", v) for k, v in lay.key_coords().items()}
    >>> da = xr.DataArray([[0.1, 0.2, 0.3, 0.0, 0.3, 0.1]], dims=("query", "key"), coords=coords)
    >>> action_to_visual(da, "image").values
    array([[0.1, 0.2],
           [0.3, 0. ]])
    >>> action_to_visual(da, "image", renormalize=True).values.round(3)
    array([[0.167, 0.333],
           [0.5  , 0.   ]])
    """
    if use_summary(ds_or_da, layers, source):
        if heads != "mean" or queries != "mean":
            raise SelectionError(
                f"the per-layer summaries hold head-and-token means only (heads='mean', queries='mean'), "
                f"not heads={heads!r}, queries={queries!r}: pass source='attention' for a layer stored in full"
            )
        grid, total = summary_grid(ds_or_da, camera, layers)
        total = grid.sum((S.PATCH_ROW, S.PATCH_COL)) if renormalize else total
    else:
        inp = resolve_input(ds_or_da)
        keys, n_rows, n_cols = camera_keys(inp.attention, camera, inp.absent_cameras)
        agg = aggregate(select_layers(inp.attention, S.LAYER, layers), heads=heads, queries=queries)
        grid = to_grid(agg.isel({S.KEY: keys}), n_rows, n_cols)
        total = grid.sum((S.PATCH_ROW, S.PATCH_COL)) if renormalize else agg.sum(S.KEY)
    out = grid / total.where(total > 0)  # 0/0 -> NaN without a warning
    out.name = S.ATTENTION
    out.attrs = {"camera": camera, "units": "share of the camera's attention" if renormalize else "share of attention"}
    return out


def region_shares(
    ds_or_da: xr.Dataset | xr.DataArray,
    *,
    heads: Any = "mean",
    queries: Any = "mean",
    layers: Any = None,
    source: str = "auto",
) -> xr.DataArray:
    """Share of attention per region (each camera slot, ``language``, ``action``), summing to 1 per row.

    ``layers`` and ``source`` as in the module docstring: ``region_shares(ds, source="summary")`` gives
    every expert layer of a store that keeps only the last 2 in full.

    >>> from attnstore.schema import TokenLayout
    >>> lay = TokenLayout(("image",), (True,), grid_rows=2, grid_cols=2, num_language=1, num_action=1)
    >>> coords = {k: ("key", v) for k, v in lay.key_coords().items()}
    >>> da = xr.DataArray([[0.1, 0.2, 0.3, 0.0, 0.3, 0.1]], dims=("query", "key"), coords=coords)
    >>> shares = region_shares(da)
    >>> shares.region.values.tolist(), shares.values.round(3).tolist()
    (['image', 'language', 'action'], [0.6, 0.3, 0.1])
    """
    if use_summary(ds_or_da, layers, source):
        sums = aggregate(summary_var(ds_or_da, V.SUMMARY_REGION_MASS, layers), heads=heads, queries=queries)
        regions = [str(r) for r in sums[S.REGION].values]
    else:
        inp = resolve_input(ds_or_da)
        agg = aggregate(select_layers(inp.attention, S.LAYER, layers), heads=heads, queries=queries)
        regions, onehot = region_onehot(agg)
        sums = xr.dot(agg.drop_vars([c for c in S.KEY_COORDS if c in agg.coords]), onehot, dim=S.KEY)
    total = sums.sum(S.REGION)
    out = (sums / total.where(total > 0)).assign_coords({S.REGION: list(regions)})
    out.name = "share"
    return out


def top_k_patches(
    ds_or_da: xr.Dataset | xr.DataArray,
    camera: str,
    k: int = 5,
    *,
    heads: Any = "mean",
    queries: Any = "mean",
    renormalize: bool = False,
    layers: Any = None,
    source: str = "auto",
) -> xr.DataArray:
    """The ``k`` most attended patches of one camera: dims (..., rank), rank 1 = most attended.

    Values are :func:`action_to_visual`'s (same ``heads``/``queries``/``renormalize``/``layers``/``source``); coords
    ``patch_row``/``patch_col`` say where each one is. Ties go to the lower patch index (row-major).

    >>> from attnstore.schema import TokenLayout
    >>> lay = TokenLayout(("image",), (True,), grid_rows=2, grid_cols=2, num_language=1, num_action=1)
    >>> coords = {k: ("key", v) for k, v in lay.key_coords().items()}
    >>> da = xr.DataArray([[0.1, 0.2, 0.3, 0.0, 0.3, 0.1]], dims=("query", "key"), coords=coords)
    >>> top = top_k_patches(da, "image", k=2)
    >>> top.values.round(3).tolist(), top.patch_row.values.tolist(), top.patch_col.values.tolist()
    ([0.3, 0.2], [1, 0], [0, 1])
    """
    grid = action_to_visual(ds_or_da, camera, heads=heads, queries=queries, renormalize=renormalize,
                            layers=layers, source=source)
    n_cols = grid.sizes[S.PATCH_COL]
    n_patches = grid.sizes[S.PATCH_ROW] * n_cols
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n_patches:
        raise SelectionError(f"top_k_patches k={k!r}: use an int in 1..{n_patches} (patches per camera)")
    flat = grid.stack(_patch=(S.PATCH_ROW, S.PATCH_COL)).drop_vars(["_patch", S.PATCH_ROW, S.PATCH_COL])
    values, index = xr.apply_ufunc(
        _top_k,
        flat,
        kwargs={"k": int(k)},
        input_core_dims=[["_patch"]],
        output_core_dims=[[S.RANK], [S.RANK]],
        dask="parallelized",
        output_dtypes=[flat.dtype, np.int64],
        dask_gufunc_kwargs={"output_sizes": {S.RANK: int(k)}},
    )
    row, col = index // n_cols, index % n_cols
    out = values.assign_coords({S.RANK: np.arange(1, k + 1), S.PATCH_ROW: row, S.PATCH_COL: col})
    out.name = "value"
    out.attrs = dict(grid.attrs)
    return out


def _top_k(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Largest ``k`` values along the last axis, with their positions (stable: ties keep index order).

    >>> _top_k(np.array([0.1, 0.3, 0.3, 0.2]), 3)
    (array([0.3, 0.3, 0.2]), array([1, 2, 3]))
    """
    idx = np.argsort(-x, axis=-1, kind="stable")[..., :k]
    return np.take_along_axis(x, idx, axis=-1), idx
