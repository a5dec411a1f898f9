"""The ``analysis`` encoding's lossy re-quantisation (the writer's; then stored by ``attnstore.denoise_predict``).

:func:`analysis_quantise` takes uint16 attention rows (the writer's round(p * 65535)) and returns new uint16
values that the codec packs tightly, trying per column (one layer/head/query across its denoise steps)
the coarsest of these that keeps every row of the column within the bounds
(:data:`attnstore.schema.encoding.ANALYSIS_BOUNDS`):

1. a **log grid** (:func:`log_levels`, relative steps of :data:`ANALYSIS_RATIOS`), with the rounding error
   carried along the keys of each region (error diffusion), so region sums and the row sum barely move;
   the codec's value table (``dictionary``) then stores each value as its small rank;
2. a **closed loop along denoise** (residual steps of :data:`ANALYSIS_STEPS` units against the previous
   step's decoded value), so values repeat across denoise steps;
3. else the column stays exact.

In every candidate each present camera's top-k patches (k = ``bounds["top_k"]``) keep their exact values
and every other patch of that camera is capped below the k-th, so the top-k patches (ties to the lower
index) are identical; zeros stay 0 and nonzeros stay >= 1.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

ANALYSIS_RATIOS = (1.0, 0.5, 0.25)  # log-grid relative steps tried first, coarsest first
LINEAR_STEP = 24  # ... and no grid gap wider than this (units of 1/65535): |error| <= 2 gaps = 48 units
ANALYSIS_STEPS = (8, 4, 2)  # then closed-loop residual steps along denoise, in units of 1/65535
_DRIFT_SCALE = 500.0  # sum(x log x) drift (units) weighed like one grid gap of sum error (0.008 nats at T = 65535)
_BOUND_MARGIN = 0.9  # the writer checks 90% of each stated bound (float32 readers differ by ~1e-7)


@lru_cache(maxsize=8)
def log_levels(ratio: float) -> np.ndarray:
    """The values of the grid of relative step ``ratio``: 0, round((1 + ratio) ** j) while the gap is under
    :data:`LINEAR_STEP`, then multiples of it, and 65535 (float64, sorted).

    >>> log_levels(0.5)[:10].tolist(), log_levels(0.5)[-3:].tolist()
    ([0.0, 1.0, 2.0, 3.0, 5.0, 8.0, 11.0, 17.0, 26.0, 38.0], [65496.0, 65520.0, 65535.0])
    >>> int(np.diff(log_levels(0.07)).max()) <= LINEAR_STEP
    True
    """
    j = np.arange(int(np.log(65535) / np.log1p(ratio)) + 2)
    grid = np.rint((1.0 + ratio) ** j)
    grid = grid[grid * ratio < LINEAR_STEP]
    linear = np.arange(0, 65536, LINEAR_STEP, dtype=np.float64)
    return np.unique(np.concatenate([[0.0], grid, linear[linear > grid.max()], [65535.0]]))


def analysis_quantise(u: np.ndarray, layout: Any, bounds: dict[str, float] | None = None) -> np.ndarray:
    """Lossy re-quantisation of uint16 attention rows ``u`` ((B, D, ..., K), axis 1 = denoise) for the
    ``analysis`` encoding, within ``bounds`` (default ``ANALYSIS_BOUNDS``); same shape, uint16."""
    from attnstore.schema.encoding import ANALYSIS_BOUNDS

    b = {**ANALYSIS_BOUNDS, **(bounds or {})}
    u = np.asarray(u, np.uint16)
    if u.ndim < 3:
        return u.copy()
    shape, K = u.shape, u.shape[-1]
    x = np.ascontiguousarray(np.moveaxis(u, 1, 0)).reshape(shape[1], -1, K).astype(np.int32)  # (D, C, K)
    regions, cameras = _row_regions(layout, K)
    flat = x.reshape(-1, K)
    protected, cap = _protect_top_k(flat, cameras, int(b["top_k"]))
    protected, cap = protected.reshape(x.shape), cap.reshape(x.shape)
    D, C = x.shape[:2]
    reference = [r.reshape(D, C, *r.shape[1:]) for r in _row_stats(flat, regions)]
    out = x.copy()
    todo = np.arange(C)
    candidates = [(_log_grid, r, regions) for r in ANALYSIS_RATIOS] + [(_closed_loop, s, None) for s in ANALYSIS_STEPS]
    for method, param, extra in candidates:
        if todo.size == 0:
            break
        q = method(x[:, todo], protected[:, todo], cap[:, todo], param, extra)
        ref = [r[:, todo].reshape(-1, *r.shape[2:]) for r in reference]
        ok = _within_bounds(q.reshape(-1, K), ref, regions, b).reshape(D, -1).all(axis=0)
        out[:, todo[ok]] = q[:, ok]
        todo = todo[~ok]
    # columns left in `todo` stay exact (out was a copy of x)
    return np.moveaxis(out.reshape(shape[1], shape[0], *shape[2:]), 0, 1).astype(np.uint16)


def _protect_top_k(flat: np.ndarray, cameras: list[tuple[int, int]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """(protected, cap) per value: each camera's top-k positions, and the cap that keeps the others below."""
    protected = np.zeros(flat.shape, bool)
    cap = np.full(flat.shape, 65535, np.int32)
    for a, z in cameras:
        if z - a < k:
            continue
        seg = flat[:, a:z]
        top = _top_k_positions(seg, k)
        np.put_along_axis(protected[:, a:z], top, True, axis=1)
        kth = top[:, -1:]
        value = np.take_along_axis(seg, kth, axis=1)
        cap[:, a:z] = np.where(np.arange(z - a)[None, :] < kth, value - 1, value).clip(0)
    return protected, cap


def _log_grid(x: np.ndarray, protected: np.ndarray, cap: np.ndarray, ratio: float,
              regions: list[tuple[int, int]]) -> np.ndarray:
    """(D, C, K) int32 on the grid of :func:`log_levels`: along the keys of each region, each value plus the
    rounding error carried so far (error diffusion: region sums barely move) becomes the grid neighbour
    with the least squared (sum error / gap) + (entropy drift / scale); the previous denoise step's value
    is kept instead when its cost is under 1 (hysteresis: values repeat along denoise).

    Value (d, k) needs (d, k - 1) and (d - 1, k), so the loop runs over the D + K - 1 anti-diagonals
    d + k = s, each one vector step over every column."""
    levels = log_levels(ratio)
    xlogx = _xlogx()
    below = np.searchsorted(levels, np.arange(65537) - 1.0, side="right")  # number of grid values < n
    top = len(levels) - 1
    D, C, K = x.shape
    is_start = np.zeros(K, bool)
    is_start[[a for a, _ in regions if a < K]] = True
    xk = np.ascontiguousarray(x.transpose(2, 0, 1))  # (K, D, C)
    pk = np.ascontiguousarray(protected.transpose(2, 0, 1)) | (xk == 0)  # kept exactly
    ck = np.ascontiguousarray(cap.transpose(2, 0, 1))
    out = np.zeros((K, D, C), np.int32)
    carry = np.zeros((D, C))  # rounding error not yet given back (units): row-sum and region drift
    drift = np.zeros((D, C))  # sum of q log q - x log x so far: entropy drift = -drift / row total
    for s in range(D + K - 1):
        d = np.arange(max(0, s - K + 1), min(D, s + 1))
        k = s - d
        carry[d[is_start[k]]] = 0.0
        v, cap_k = xk[k, d], ck[k, d]
        t = v + carry[d]
        i = below[np.minimum(np.ceil(np.maximum(t, 0.0)), 65536).astype(np.int64)]
        np.clip(i, 1, top, out=i)  # levels[i - 1] < t <= levels[i]
        lo = np.maximum(np.minimum(levels[i - 1], cap_k), 1).astype(np.int64)
        hi = np.maximum(np.minimum(levels[i], cap_k), 1).astype(np.int64)
        gap = np.maximum(hi - lo, 1).astype(np.float64)
        base = drift[d] - xlogx[v]
        d_lo, d_hi = base + xlogx[lo], base + xlogx[hi]
        cost_lo = ((t - lo) / gap) ** 2 + (d_lo / _DRIFT_SCALE) ** 2
        pick_lo = cost_lo <= ((t - hi) / gap) ** 2 + (d_hi / _DRIFT_SCALE) ** 2
        q = np.where(pick_lo, lo, hi)
        new_drift = np.where(pick_lo, d_lo, d_hi)
        prev = out[k, np.maximum(d - 1, 0)].astype(np.int64)  # the previous denoise step's value (d > 0)
        prev = np.maximum(np.minimum(prev, cap_k), 1)
        d_prev = base + xlogx[prev]
        same = ((t - prev) / gap) ** 2 + (d_prev / _DRIFT_SCALE) ** 2 <= 1.0
        same &= (d > 0)[:, None]
        q = np.where(same, prev, q)
        new_drift = np.where(same, d_prev, new_drift)
        keep = pk[k, d]
        q = np.where(keep, v, q)
        drift[d] = np.where(keep, drift[d], new_drift)
        carry[d] = np.minimum(np.maximum(t - q, -gap), gap)  # what a cap or a kept value cannot take is dropped
        out[k, d] = q
    return np.ascontiguousarray(out.transpose(1, 2, 0))


def _closed_loop(x: np.ndarray, protected: np.ndarray, cap: np.ndarray, step: int, _: Any = None) -> np.ndarray:
    """(D, C, K) int32: each denoise step coded as previous decoded + round(residual / step) * step."""
    q = np.empty_like(x)
    for d in range(x.shape[0]):
        if d == 0:
            v = np.rint(x[0] / step).astype(np.int32) * step
        else:
            v = q[d - 1] + np.rint((x[d] - q[d - 1]) / step).astype(np.int32) * step
        np.clip(v, 1, 65535, out=v)
        np.minimum(v, cap[d], out=v)
        v[protected[d]] = x[d][protected[d]]
        v[x[d] == 0] = 0
        q[d] = v
    return q


def _row_regions(layout: Any, n_keys: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(start, stop) of every key region, and of the present cameras, clipped to rows of ``n_keys``."""
    regions, cameras = [], []
    for name in layout.regions:
        s = layout.region_slice(name)
        a, z = min(s.start, n_keys), min(s.stop, n_keys)
        if z > a:
            regions.append((a, z))
            if name in layout.cameras and layout.camera_present[layout.cameras.index(name)]:
                cameras.append((a, z))
    return regions, cameras


def _top_k_positions(seg: np.ndarray, k: int) -> np.ndarray:
    """(rows, k) positions of the k largest values per row, rank order, ties to the lower index."""
    n = seg.shape[1]
    key = seg.astype(np.int64) * n + (n - 1 - np.arange(n))  # distinct; larger = ranks first
    part = np.argpartition(-key, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(key, part, axis=1), axis=1)
    return np.take_along_axis(part, order, axis=1)


def _row_stats(rows: np.ndarray, regions: list[tuple[int, int]]) -> list[np.ndarray]:
    """Per row: [sum, region shares (rows, n_regions), entropy (nats, over nonzero keys), values]."""
    total = rows.sum(axis=1, dtype=np.float64)
    safe = np.maximum(total, 1.0)
    shares = np.stack([rows[:, a:z].sum(axis=1, dtype=np.float64) / safe for a, z in regions], axis=1)
    # -sum p log p with p = x / T: log T - sum(x log x) / T, x log x from a table of the 65536 integers
    entropy = np.log(safe) - _xlogx()[rows].sum(axis=1) / safe
    return [total, shares, entropy, rows]


@lru_cache(maxsize=1)
def _xlogx() -> np.ndarray:
    """x * log(x) for the integers 0..65535 (0 at 0)."""
    x = np.arange(65536, dtype=np.float64)
    return x * np.log(np.maximum(x, 1.0))


def _within_bounds(q: np.ndarray, reference: list[np.ndarray], regions: list[tuple[int, int]],
                   b: dict[str, float]) -> np.ndarray:
    """Rows of ``q`` whose sum, region shares, entropy and values are within the bounds of the reference."""
    total, shares, entropy, values = reference
    got_total, got_shares, got_entropy, _ = _row_stats(q, regions)
    m = _BOUND_MARGIN
    ok = np.abs(got_total - total) <= m * b["row_sum"] * np.maximum(total, 1.0)
    ok &= (np.abs(got_shares - shares) <= m * b["region_share"]).all(axis=1)
    ok &= np.abs(got_entropy - entropy) <= m * b["entropy"]
    ok &= (np.abs(q - values) <= m * b["value"] * 65535).all(axis=1)
    return ok
