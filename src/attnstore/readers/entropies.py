"""Shannon entropy of attention rows, over their valid keys or over their region shares.

From the full maps or, with ``source=``, from the per-layer summaries (which store each row's entropy
over keys and its region masses): ``layers`` and ``source`` as in :mod:`attnstore.readers.regions`.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import xarray as xr

from attnstore import schema as S
from attnstore.errors import SelectionError
from attnstore.readers.keys import region_onehot, resolve_input
from attnstore.readers.layers import select_layers, summary_var, use_summary
from attnstore.schema import variables as V


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
    ``layers`` and ``source`` as in :mod:`attnstore.readers.regions` (the summaries store the entropy over
    keys of every row and its region masses, so both ``over`` work from them).

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
    if use_summary(ds_or_da, layers, source):
        return _summary_entropy(ds_or_da, over, normalize, key_valid, layers)
    inp = resolve_input(ds_or_da, key_valid)
    if normalize and inp.key_valid is None:
        raise SelectionError(
            "entropy(normalize=True) needs the valid keys: pass the Dataset, or key_valid=ds.key_valid"
        )
    att = select_layers(inp.attention, S.LAYER, layers)
    valid = inp.key_valid
    if valid is not None:
        _check_valid_dims(valid, att)
        att = att.where(valid, 0.0)
    if over == "keys":
        p, dim = att, S.KEY
        n = valid.sum(S.KEY) if valid is not None else None
    else:
        regions, onehot = region_onehot(att)
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


def _summary_entropy(ds: xr.Dataset, over: str, normalize: bool, key_valid: Any, layers: Any) -> xr.DataArray:
    valid = key_valid if key_valid is not None else ds.get(S.KEY_VALID)
    if normalize and valid is None:
        raise SelectionError("entropy(normalize=True) needs the valid keys: pass the Dataset, or key_valid=ds.key_valid")
    if over == "keys":
        h = summary_var(ds, V.SUMMARY_ENTROPY, layers)
        n = valid.sum(S.KEY) if valid is not None else None
    else:
        mass = summary_var(ds, V.SUMMARY_REGION_MASS, layers)
        h = _row_entropy(mass, S.REGION)
        n = None
        if valid is not None:
            _, onehot = region_onehot(valid)
            n = _valid_regions(valid, onehot)
    return _finish_entropy(h, n, normalize, over)
