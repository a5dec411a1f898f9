"""The key axis of an analysis input: what was passed (Dataset or DataArray), camera patch grids and regions.

Everything here reads the ``key`` coordinates (``key_region``, ``key_kind``, ``patch_row``, ``patch_col``)
that :func:`attnstore.open_attention` attaches, so it works on a Dataset, its attention, or a ``.sel`` of it
that kept whole keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import xarray as xr

from attnstore import schema as S
from attnstore.errors import SelectionError


@dataclass(frozen=True)
class AttentionInput:
    """The attention array to analyse, plus what is known about its keys."""

    attention: xr.DataArray
    key_valid: xr.DataArray | None  # (inference, key) bool, when known
    absent_cameras: tuple[str, ...]  # layout slots the policy did not get (known for Datasets only)


def resolve_input(ds_or_da: xr.Dataset | xr.DataArray, key_valid: xr.DataArray | None = None) -> AttentionInput:
    """The attention (and its key validity and absent camera slots) of a Dataset or an attention DataArray."""
    if isinstance(ds_or_da, xr.Dataset):
        from attnstore.store.open import spec_of

        layout = spec_of(ds_or_da).layout
        absent = tuple(c for c, present in zip(layout.cameras, layout.camera_present) if not present)
        if S.ATTENTION not in ds_or_da:
            raise SelectionError("the dataset has no 'attention' variable: open a store with attnstore.open_attention")
        valid = key_valid if key_valid is not None else ds_or_da.get(S.KEY_VALID)
        return AttentionInput(ds_or_da[S.ATTENTION], valid, absent)
    if not isinstance(ds_or_da, xr.DataArray):
        raise SelectionError(f"expected an xarray Dataset or DataArray, got {type(ds_or_da).__name__}")
    if S.KEY not in ds_or_da.dims or S.KEY_REGION not in ds_or_da.coords:
        raise SelectionError(
            "the attention array has no 'key' dim with 'key_region' coords: pass ds or ds.attention "
            "without selecting single keys"
        )
    return AttentionInput(ds_or_da, key_valid, ())


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
    region = key_strings(da[S.KEY_REGION])
    image = key_strings(da[S.KEY_KIND]) == S.KIND_IMAGE if S.KEY_KIND in da.coords else None
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


def to_grid(cam: xr.DataArray, n_rows: int, n_cols: int) -> xr.DataArray:
    """Reshape one camera's (..., key) slice to (..., patch_row, patch_col); stays lazy."""
    cam = cam.drop_vars([c for c in cam.coords if S.KEY in cam[c].dims]).transpose(..., S.KEY)
    data = cam.data.reshape(cam.shape[:-1] + (n_rows, n_cols))
    out = xr.DataArray(data, coords=cam.coords, dims=cam.dims[:-1] + (S.PATCH_ROW, S.PATCH_COL))
    return out.assign_coords({S.PATCH_ROW: np.arange(n_rows), S.PATCH_COL: np.arange(n_cols)})


def region_onehot(da: xr.DataArray) -> tuple[tuple[str, ...], xr.DataArray]:
    """Regions in key order and a (key, region) 0/1 matrix, so a dot product sums keys per region."""
    region = key_strings(da[S.KEY_REGION])
    names = tuple(str(r) for r in dict.fromkeys(region))
    onehot = (region[:, None] == np.asarray(names)[None, :]).astype(np.float32)
    return names, xr.DataArray(onehot, dims=(S.KEY, S.REGION))


def key_strings(coord: xr.DataArray) -> np.ndarray:
    """A string coordinate as a plain ``<U`` array (zarr gives numpy's StringDType, which won't cast)."""
    return np.array([str(v) for v in np.asarray(coord.values).ravel()])
