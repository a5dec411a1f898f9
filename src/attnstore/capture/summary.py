"""Per-layer attention summaries, computed on the policy's device from the probabilities the hooks see.

For every expert layer (whatever layers are stored in full), per inference, denoise step, head and action
token: the attention mass of each key region (each camera slot, ``language``, ``action``) and the row
entropy; per denoise step and layer, the head-and-token-mean patch grid of each present camera. With
prefix capture on, the same mass and entropy for every VLM layer's prefix queries. A few MB per model run
instead of 16 MB per layer, so a last-2 store still answers "where does layer 5 look".

Definitions (what the readers compute from full attention, see :mod:`attnstore.readers.regions`):

* mass[r] = sum of p over the keys of region r (raw, not renormalised: masked keys are 0 already);
* entropy = Shannon entropy (nats) of the row renormalised over its valid keys, 0 log 0 = 0;
  with s = sum of valid p: H = log s - sum(p log p) / s, one pass over the keys;
* grid[c] = mean over heads and action tokens of p on camera c's patches, as a (rows, cols) grid.

Everything is float32 on the device, stored as float16 (relative error <= 2**-11, zeros exact). The
functions are torch, so they run where the model runs (CUDA or CPU), in a few passes over the keys: slice
sums for the masses, one log (on the CPU numpy's or torch's, whichever is faster there: :func:`cpu_log`)
and two product-sums for the entropy, one mean for the grids (0.4-2 ms per 8 x 50 x 1018 block
on one core, depending on the CPU: ``bench/bench_summary.py``).

>>> import torch
>>> from attnstore.schema import TokenLayout
>>> lay = TokenLayout(("image",), (True,), grid_rows=1, grid_cols=2, num_language=1, num_action=1)
>>> plan = SummaryPlan(lay, torch.device("cpu"))
>>> p = torch.tensor([[[[0.25, 0.25, 0.5, 0.0]]]])        # (B, H, Q, K): 2 patches, 1 language, 1 action
>>> mass, ent, grid = plan.expert(p, plan.key_valid(torch.tensor([[True]])))
>>> mass.tolist(), round(float(ent), 4), grid.tolist()
([[[[0.5, 0.5, 0.0]]]], 1.0397, [[[[0.25, 0.25]]]])
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from attnstore.schema import StoreSpec, TokenLayout

STORED_DTYPE = "float16"  # what the summaries are stored as (the variable table's dtype)


class SummaryPlan:
    """The constant tensors of one token layout on one device (static validity, cameras' patch keys)."""

    def __init__(self, layout: TokenLayout, device: Any) -> None:
        import torch

        self.layout = layout
        self.device = torch.device(device)
        self.static_valid = torch.as_tensor(layout.static_key_valid()).to(self.device)  # (K,) bool
        cams = [layout.region_slice(c) for c, p in zip(layout.cameras, layout.camera_present) if p]
        self.num_cameras = len(cams)
        index = torch.cat([torch.arange(c.start, c.stop) for c in cams]) if cams else torch.zeros(0, dtype=torch.long)
        self.camera_keys = index.to(self.device)  # key positions of the present cameras' patches, in order
        self.language = layout.region_slice("language")
        # the log's buffer, reused call after call (an allocation costs a pass); one per thread: the CPU
        # staged path summarises on the writer thread while prefix hooks may run on the inference thread
        self._scratch = threading.local()

    def key_valid(self, language_mask) -> Any:
        """(B, K) float32 key validity as 0/1 on the device, per batch row (the entropy's mask)."""
        import torch

        mask = language_mask.to(self.device, torch.bool)
        valid = self.static_valid.expand(mask.shape[0], -1).clone()
        valid[:, self.language] = mask
        return valid.float()

    def expert(self, probs, valid) -> tuple[Any, Any, Any]:
        """Region mass (..., H, Q, R), entropy (..., H, Q) and camera grids (..., C, rows, cols), float32.

        ``probs``: (B, ..., H, Q, K) action-token attention (any float dtype; ``...`` e.g. layers);
        ``valid``: :meth:`key_valid` of the batch.
        """
        p = probs.float()
        mass, ent = self.mass(p), _entropy(p, valid, self._buffer(p))
        lay = self.layout
        mean = p.mean(dim=(-3, -2))  # (B, ..., K): head-and-token mean
        grid = mean.index_select(-1, self.camera_keys)
        return mass, ent, grid.reshape(*mean.shape[:-1], self.num_cameras, lay.grid_rows, lay.grid_cols)

    def prefix(self, probs, valid) -> tuple[Any, Any]:
        """Region mass (B, H, P, R) and entropy (B, H, P) of the prefix queries' rows (VLM layers).

        ``probs``: (B, H, P, P) prefix self-attention; ``valid`` as for :meth:`expert` (first P keys used).
        """
        p = probs.float()
        return self.mass(p), _entropy(p, valid[:, : p.shape[-1]], self._buffer(p))

    def mass(self, p):
        """(..., R) attention mass of each region of :attr:`TokenLayout.regions` in rows ``p`` (..., K):
        sums over contiguous key slices (the cameras' in one reduction), a region past the last key is 0.

        >>> import torch
        >>> from attnstore.schema import TokenLayout
        >>> lay = TokenLayout(("a", "b"), (True, True), grid_rows=1, grid_cols=2, num_language=1, num_action=1)
        >>> SummaryPlan(lay, "cpu").mass(torch.tensor([[0.1, 0.2, 0.3, 0.0, 0.25, 0.15]])).tolist()
        [[0.30000001192092896, 0.30000001192092896, 0.25, 0.15000000596046448]]
        >>> SummaryPlan(lay, "cpu").mass(torch.tensor([[0.1, 0.2, 0.3, 0.0, 0.4]])).tolist()  # 5 prefix keys
        [[0.30000001192092896, 0.30000001192092896, 0.4000000059604645, 0.0]]
        """
        import torch

        lay = self.layout
        n = len(lay.cameras)
        parts = []
        if n:  # every camera slot is keys_per_camera keys, its patches after camera_start_tokens
            cams = p[..., : n * lay.keys_per_camera].unflatten(-1, (n, lay.keys_per_camera))
            start = lay.camera_start_tokens
            parts.append(cams[..., start : start + lay.patches_per_camera].sum(-1))
        parts += [p[..., lay.region_slice(r)].sum(-1, keepdim=True) for r in lay.regions[n:]]
        return torch.cat(parts, -1)

    def _buffer(self, like):
        buf = getattr(self._scratch, "buf", None)
        if buf is None or buf.shape != like.shape or buf.device != like.device:
            import torch

            self._scratch.buf = buf = torch.empty_like(like, dtype=torch.float32)
        return buf


def _per_row(x, ndim: int):
    """(B, ...) -> (B, 1, ..., ...): broadcast a per-batch-row tensor over the dims between the batch
    and the (query, key) dims of an ``ndim``-dimensional attention tensor."""
    return x.reshape(x.shape[0], *([1] * (ndim - 3)), *x.shape[1:])


def _entropy(p, valid, scratch):
    """Entropy (nats) over the valid keys, renormalised, of each row of ``p`` (float32, (B, ..., K)).

    With s = sum of valid p: H = log s - sum(valid p log p) / s. Passes over the keys: log(p + tiny)
    (:func:`_log_tiny`), the validity multiplied in, two fused product-sums (the p log p sum and s).
    """
    import torch

    tiny = torch.finfo(torch.float32).tiny
    v = _per_row(valid, p.ndim).unsqueeze(-2)  # (B, 1, ..., 1, K)
    logp = _log_tiny(p, tiny, scratch).mul_(v)
    plogp = torch.einsum("...k,...k->...", p, logp)
    s = (p @ v.transpose(-1, -2)).squeeze(-1)
    safe = s.clamp_min(tiny)
    return torch.where(s > 0, safe.log() - plogp / safe, torch.zeros_like(s))


def _log_tiny(p, tiny: float, out):
    """``out`` = log(p + tiny), float32: a zero becomes the smallest normal float, so 0 * log(tiny) = 0 (no
    log(0), no NaN); p >= 2e-31 is unchanged by the addition, a smaller p's p log p moves by < 1e-29. On the
    CPU through :func:`cpu_log` (numpy's or torch's, whichever is faster here); elsewhere torch.

    >>> import torch
    >>> p, tiny = torch.tensor([1.0, 0.5, 1e-20, 0.0]), torch.finfo(torch.float32).tiny
    >>> got, want = _log_tiny_numpy(p, tiny, torch.empty(4)), _log_tiny_torch(p, tiny, torch.empty(4))
    >>> torch.allclose(got, want, rtol=1e-6), round(float(got[-1]), 2)
    (True, -87.34)
    """
    if p.device.type != "cpu":
        return _log_tiny_torch(p, tiny, out)
    return cpu_log()(p, tiny, out)


def _log_tiny_numpy(p, tiny: float, out):
    dest = out.numpy()
    np.log(np.add(p.detach().numpy(), np.float32(tiny), out=dest), out=dest)  # detach: a grad-mode caller too
    return out


def _log_tiny_torch(p, tiny: float, out):
    import torch

    return torch.add(p, tiny, out=out).log_()


_CPU_LOG: list[Any] = []  # the log cpu_log chose, once per process


def cpu_log():
    """The faster of numpy's and torch's float32 log on this CPU, timed once per process on an 8 x 50 x 1018
    block (~10 ms, on the thread that first summarises: the CPU writer thread, single-threaded torch).

    Which one wins depends on the CPU: on one 2-core VM numpy's log took 0.14 ms a block against torch's
    0.38; on an AVX2-only AMD EPYC one the summaries with torch's log take 2.02 ms a block against 2.28
    with numpy's (``bench/bench_summary.py`` shows both). The two agree to float32 rounding; the
    summaries are stored as float16.

    >>> cpu_log() in (_log_tiny_numpy, _log_tiny_torch) and cpu_log() is cpu_log()
    True
    """
    if not _CPU_LOG:
        _CPU_LOG.append(fastest((_log_tiny_numpy, _log_tiny_torch)))
    return _CPU_LOG[0]


def fastest(logs, shape=(8, 50, 1018), rounds: int = 3):
    """The function of ``logs`` with the smallest time of ``rounds`` interleaved calls on random ``shape``."""
    import time

    import torch

    p = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    out, tiny = torch.empty(shape), float(torch.finfo(torch.float32).tiny)
    best = {f: float("inf") for f in logs}
    for _ in range(rounds):
        for f in logs:
            start = time.perf_counter()
            f(p, tiny, out)
            best[f] = min(best[f], time.perf_counter() - start)
    return min(logs, key=best.__getitem__)


@dataclass
class SummaryBuffers:
    """The summaries of one model run, on the device until :meth:`to_host` (stored dtype)."""

    region_mass: Any = None  # (B, D, L, H, Q, R)
    entropy: Any = None  # (B, D, L, H, Q)
    grid: Any = None  # (B, D, L, C, rows, cols)
    prefix_region_mass: Any = None  # (B, PL, H, P, R)
    prefix_entropy: Any = None  # (B, PL, H, P)

    @classmethod
    def allocate(cls, spec: StoreSpec, batch_size: int, device: Any) -> SummaryBuffers:
        import torch

        from attnstore import schema as S

        out = cls()
        dtype = getattr(torch, STORED_DTYPE)
        for field, name in _FIELDS.items():
            shape = S.VARIABLE[name].row_shape(spec)
            if shape is not None:
                setattr(out, field, torch.zeros((batch_size, *shape), dtype=dtype, device=device))
        return out

    @property
    def batch_size(self) -> int:
        return int(next(iter(self.variables().values())).shape[0])

    @property
    def device(self) -> Any:
        return next(iter(self.variables().values())).device

    def variables(self) -> dict[str, Any]:
        """Variable name -> tensor, for the InferenceBatch (absent ones left out)."""
        return {name: getattr(self, field) for field, name in _FIELDS.items() if getattr(self, field) is not None}


_FIELDS = {
    "region_mass": "summary_region_mass",
    "entropy": "summary_entropy",
    "grid": "summary_grid",
    "prefix_region_mass": "summary_prefix_region_mass",
    "prefix_entropy": "summary_prefix_entropy",
}
