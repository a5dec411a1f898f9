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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import xarray as xr

from attnstore import schema as S
from attnstore.errors import SelectionError
from attnstore.readers.aggregate import aggregate, reduce_dim
from attnstore.schema import variables as V

SOURCES = ("auto", "attention", "summary")


@dataclass(frozen=True)
class _Input:
    """The attention array to analyse, plus what is known about its keys."""

    attention: xr.DataArray
    key_valid: xr.DataArray | None  # (inference, key) bool, when known
    absent_cameras: tuple[str, ...]  # layout slots the policy did not get (known for Datasets only)


def _resolve(ds_or_da: xr.Dataset | xr.DataArray, key_valid: xr.DataArray | None = None) -> _Input:
    if isinstance(ds_or_da, xr.Dataset):
        from attnstore.store.open import spec_of

        layout = spec_of(ds_or_da).layout
        absent = tuple(c for c, present in zip(layout.cameras, layout.camera_present) if not present)
        if S.ATTENTION not in ds_or_da:
            raise SelectionError("the dataset has no 'attention' variable: open a store with attnstore.open_attention")
        valid = key_valid if key_valid is not None else ds_or_da.get(S.KEY_VALID)
        return _Input(ds_or_da[S.ATTENTION], valid, absent)
    if not isinstance(ds_or_da, xr.DataArray):
        raise SelectionError(f"expected an xarray Dataset or DataArray, got {type(ds_or_da).__name__}")
    if S.KEY not in ds_or_da.dims or S.KEY_REGION not in ds_or_da.coords:
        raise SelectionError(
            "the attention array has no 'key' dim with 'key_region' coords: pass ds or ds.attention "
            "without selecting single keys"
        )
    return _Input(ds_or_da, key_valid, ())


def camera_keys(da: xr.DataArray, camera: str, absent: tuple[str, ...] = ()) -> tuple[slice, int, int]:
    """Key positions and grid size (rows, cols) of one camera, from the array's key coordinates.

    >>> from attnstore.schema import TokenLayout
    >>> lay = TokenLayout(("image", "wrist"), (True, True), grid_rows=2, grid_cols=3, num_language=1, num_action=1)
    >>> coords = {k: ("key", v) for k, v in lay.key_coords().items()}
    >>> da = xr.DataArray(np.zeros(lay.num_keys), dims="key", coords=coords)
    >>> camera_keys(da, "wrist")
    (slice(6, 12, None), 2, 3)
    >>> camera_keys(da, "front")
    Traceback (most recent call last):
    ...
    attnstore.errors.SelectionError: camera 'front' is not in this store; its cameras are ['image', 'wrist']
    """
    region = _strings(da[S.KEY_REGION])
    image = _strings(da[S.KEY_KIND]) == S.KIND_IMAGE if S.KEY_KIND in da.coords else None
    cameras = [str(c) for c in dict.fromkeys(region[image] if image is not None else region)]
    cameras = [c for c in cameras if c not in (S.REGION_LANGUAGE, S.REGION_ACTION)]
    present = [c for c in cameras if c not in absent]
    if camera not in cameras:
        raise SelectionError(f"camera '{camera}' is not in this store; its cameras are {present}")
    if camera in absent:
        raise SelectionError(
            f"camera '{camera}' was not in the policy's input (a masked placeholder slot, attention 0 by "
            f"construction); choose one of {present}"
        )
    pos = np.flatnonzero(region == camera)
    rows = np.asarray(da[S.PATCH_ROW].values)[pos]
    cols = np.asarray(da[S.PATCH_COL].values)[pos]
    n_rows, n_cols = int(rows.max()) + 1, int(cols.max()) + 1
    contiguous = pos[-1] - pos[0] + 1 == pos.size
    if not contiguous or pos.size != n_rows * n_cols or np.any(rows * n_cols + cols != np.arange(pos.size)):
        raise SelectionError(
            f"camera '{camera}': its keys are not a whole row-major patch grid (were keys sub-selected?)"
        )
    return slice(int(pos[0]), int(pos[-1]) + 1), n_rows, n_cols


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
    if _use_summary(ds_or_da, layers, source):
        if heads != "mean" or queries != "mean":
            raise SelectionError(
                f"the per-layer summaries hold head-and-token means only (heads='mean', queries='mean'), "
                f"not heads={heads!r}, queries={queries!r}: pass source='attention' for a layer stored in full"
            )
        grid, total = _summary_grid(ds_or_da, camera, layers)
        total = grid.sum((S.PATCH_ROW, S.PATCH_COL)) if renormalize else total
    else:
        inp = _resolve(ds_or_da)
        keys, n_rows, n_cols = camera_keys(inp.attention, camera, inp.absent_cameras)
        agg = aggregate(_select_layers(inp.attention, S.LAYER, layers), heads=heads, queries=queries)
        grid = _to_grid(agg.isel({S.KEY: keys}), n_rows, n_cols)
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
    if _use_summary(ds_or_da, layers, source):
        sums = aggregate(_summary_var(ds_or_da, V.SUMMARY_REGION_MASS, layers), heads=heads, queries=queries)
        regions = [str(r) for r in sums[S.REGION].values]
    else:
        inp = _resolve(ds_or_da)
        agg = aggregate(_select_layers(inp.attention, S.LAYER, layers), heads=heads, queries=queries)
        regions, onehot = _region_onehot(agg)
        sums = xr.dot(agg.drop_vars([c for c in S.KEY_COORDS if c in agg.coords]), onehot, dim=S.KEY)
    total = sums.sum(S.REGION)
    out = (sums / total.where(total > 0)).assign_coords({S.REGION: list(regions)})
    out.name = "share"
    return out


def entropy(
    ds_or_da: xr.Dataset | xr.DataArray,
    *,
    over: Literal["keys", "region"] = "keys",
    normalize: bool = False,
    key_valid: xr.DataArray | None = None,
    layers: Any = None,
    source: str = "auto",
) -> xr.DataArray:
    """Shannon entropy (nats) of each attention row, over its valid keys or over its region shares.

    Rows are renormalised over the valid keys first; ``0 * log 0 = 0``. ``normalize=True`` divides by
    ``log(n)``, n = number of valid keys (or of regions holding a valid key), so 1 = uniform;
    rows with n = 1 give 0. Validity comes from the Dataset's ``key_valid`` or from ``key_valid=``;
    without either, every key counts as valid (``normalize=True`` then raises, as n would be a guess).
    No head/query averaging: aggregate the result (mean of entropies) rather than the input.
    ``layers`` and ``source`` as in the module docstring (the summaries store the entropy over keys of
    every row and its region masses, so both ``over`` work from them).

    >>> from attnstore.schema import TokenLayout
    >>> lay = TokenLayout(("image",), (True,), grid_rows=2, grid_cols=2, num_language=1, num_action=1)
    >>> coords = {k: ("key", v) for k, v in lay.key_coords().items()}
    >>> da = xr.DataArray([[0.25, 0.25, 0.25, 0.25, 0.0, 0.0]], dims=("query", "key"), coords=coords)
    >>> float(entropy(da)[0]) == float(np.log(4))
    True
    >>> float(entropy(da, over="region")[0])
    0.0
    """
    if over not in ("keys", "region"):
        raise SelectionError(f"entropy over='{over}': use 'keys' or 'region'")
    if _use_summary(ds_or_da, layers, source):
        return _summary_entropy(ds_or_da, over, normalize, key_valid, layers)
    inp = _resolve(ds_or_da, key_valid)
    if normalize and inp.key_valid is None:
        raise SelectionError(
            "entropy(normalize=True) needs the valid keys: pass the Dataset, or key_valid=ds.key_valid"
        )
    att = _select_layers(inp.attention, S.LAYER, layers)
    valid = inp.key_valid
    if valid is not None:
        _check_valid_dims(valid, att)
        att = att.where(valid, 0.0)
    if over == "keys":
        p, dim = att, S.KEY
        n = valid.sum(S.KEY) if valid is not None else None
    else:
        regions, onehot = _region_onehot(att)
        p, dim = xr.dot(att.drop_vars([c for c in S.KEY_COORDS if c in att.coords]), onehot, dim=S.KEY), S.REGION
        n = _valid_regions(valid, onehot) if valid is not None else None
    return _finish_entropy(_row_entropy(p, dim), n, normalize, over)


def _check_valid_dims(valid: xr.DataArray, att: xr.DataArray) -> None:
    extra = [d for d in valid.dims if d not in att.dims and d != S.KEY]
    if extra:  # would broadcast one attention row over every inference
        raise SelectionError(f"key_valid has dims {extra} the attention array lacks: select the same rows from both")


def _valid_regions(valid: xr.DataArray, onehot: xr.DataArray) -> xr.DataArray:
    """Number of regions holding at least one valid key, per row of ``valid``."""
    bare = valid.drop_vars([c for c in S.KEY_COORDS if c in valid.coords]).astype(np.float32)
    return (xr.dot(bare, onehot, dim=S.KEY) > 0).sum(S.REGION)


def _row_entropy(p: xr.DataArray, dim: str) -> xr.DataArray:
    """Entropy (nats) along ``dim`` of ``p`` renormalised to sum 1; 0 log 0 = 0."""
    total = p.sum(dim)
    p = p / total.where(total > 0)
    plogp = p * np.log(p.where(p > 0))  # NaN where p == 0, skipped by the sum: 0 log 0 = 0
    return 0.0 - plogp.sum(dim, skipna=True) + 0.0  # + 0.0 turns -0.0 into 0.0


def _finish_entropy(h: xr.DataArray, n: xr.DataArray | None, normalize: bool, over: str) -> xr.DataArray:
    if normalize:
        h = (h / np.log(n.where(n > 1))).fillna(0.0)
    h.name = "entropy"
    h.attrs = {"units": "fraction of log(n)" if normalize else "nats", "over": over}
    return h


# ---- the per-layer summaries (source="summary") ----------------------------------------------------
def _use_summary(ds_or_da: Any, layers: Any, source: str) -> bool:
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
    wanted = _wanted_labels(layers)
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


def _wanted_labels(layers: Any) -> list[int] | None:
    """The layer labels a ``layers=`` selection names (None: all, or a slice: decided by the data)."""
    if layers is None or isinstance(layers, slice):
        return None
    if isinstance(layers, (int, np.integer)):
        return [int(layers)]
    return [int(v) for v in layers]


def _labels_of(ds: xr.Dataset, dim: str) -> list[int] | None:
    if dim in ds.coords:
        return [int(v) for v in np.atleast_1d(ds[dim].values)]
    return None


def _select_layers(da: xr.DataArray, dim: str, layers: Any) -> xr.DataArray:
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
        wanted = _wanted_labels(layers)
        missing = [v for v in wanted if v not in labels]
        if missing or not wanted:
            raise SelectionError(f"layers {missing or wanted} not available; this array has layers {labels}")
        picked = da.sel({dim: wanted})
    if picked.sizes[dim] == 0:
        raise SelectionError(f"layers={layers} selects nothing; this array has layers {labels}")
    return picked


def _summary_var(ds: xr.Dataset, name: str, layers: Any) -> xr.DataArray:
    """A summary variable as float32 with its ``summary_layer`` dim named ``layer``, layers selected."""
    if name not in ds:
        raise SelectionError(f"the dataset has no '{name}' (per-layer summaries): pass source='attention'")
    da = ds[name]
    da = da.astype(np.float32) if da.dtype != np.float32 else da
    if V.SUMMARY_LAYER in da.dims or V.SUMMARY_LAYER in da.coords:
        da = da.rename({V.SUMMARY_LAYER: S.LAYER})
    return _select_layers(da, S.LAYER, layers)


def _summary_grid(ds: xr.Dataset, camera: str, layers: Any) -> tuple[xr.DataArray, xr.DataArray]:
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
    grids = _summary_var(ds, V.SUMMARY_GRID, layers)
    grid = grids.sel({S.CAMERA: camera}).drop_vars(S.CAMERA)
    grid = grid.rename({V.GRID_ROW: S.PATCH_ROW, V.GRID_COL: S.PATCH_COL})
    grid = grid.assign_coords({S.PATCH_ROW: np.arange(grid.sizes[S.PATCH_ROW]),
                               S.PATCH_COL: np.arange(grid.sizes[S.PATCH_COL])})
    mass = _summary_var(ds, V.SUMMARY_REGION_MASS, layers)
    total = aggregate(mass, heads="mean", queries="mean").sum(S.REGION)
    return grid, total


def _summary_entropy(ds: xr.Dataset, over: str, normalize: bool, key_valid: Any, layers: Any) -> xr.DataArray:
    valid = key_valid if key_valid is not None else ds.get(S.KEY_VALID)
    if normalize and valid is None:
        raise SelectionError("entropy(normalize=True) needs the valid keys: pass the Dataset, or key_valid=ds.key_valid")
    if over == "keys":
        h = _summary_var(ds, V.SUMMARY_ENTROPY, layers)
        n = valid.sum(S.KEY) if valid is not None else None
    else:
        mass = _summary_var(ds, V.SUMMARY_REGION_MASS, layers)
        h = _row_entropy(mass, S.REGION)
        n = None
        if valid is not None:
            _, onehot = _region_onehot(valid)
            n = _valid_regions(valid, onehot)
    return _finish_entropy(h, n, normalize, over)


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


def _to_grid(cam: xr.DataArray, n_rows: int, n_cols: int) -> xr.DataArray:
    """Reshape one camera's (..., key) slice to (..., patch_row, patch_col); stays lazy."""
    cam = cam.drop_vars([c for c in cam.coords if S.KEY in cam[c].dims]).transpose(..., S.KEY)
    data = cam.data.reshape(cam.shape[:-1] + (n_rows, n_cols))
    out = xr.DataArray(data, coords=cam.coords, dims=cam.dims[:-1] + (S.PATCH_ROW, S.PATCH_COL))
    return out.assign_coords({S.PATCH_ROW: np.arange(n_rows), S.PATCH_COL: np.arange(n_cols)})


def _region_onehot(da: xr.DataArray) -> tuple[tuple[str, ...], xr.DataArray]:
    """Regions in key order and a (key, region) 0/1 matrix, so a dot product sums keys per region."""
    region = _strings(da[S.KEY_REGION])
    names = tuple(str(r) for r in dict.fromkeys(region))
    onehot = (region[:, None] == np.asarray(names)[None, :]).astype(np.float32)
    return names, xr.DataArray(onehot, dims=(S.KEY, S.REGION))


def _strings(coord: xr.DataArray) -> np.ndarray:
    """A string coordinate as a plain ``<U`` array (zarr gives numpy's StringDType, which won't cast)."""
    return np.array([str(v) for v in np.asarray(coord.values).ravel()])
