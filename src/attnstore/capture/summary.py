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
functions are plain torch, so they run where the model runs (CUDA or CPU) and cost a few reductions.

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

from attnstore.schema import StoreSpec, TokenLayout

STORED_DTYPE = "float16"  # what the summaries are stored as (the variable table's dtype)


class SummaryPlan:
    """The constant tensors of one token layout on one device (region one-hot, static validity, cameras)."""

    def __init__(self, layout: TokenLayout, device: Any) -> None:
        import torch

        self.layout = layout
        self.device = torch.device(device)
        regions = layout.regions
        onehot = torch.zeros(layout.num_keys, len(regions), dtype=torch.float32)
        for j, name in enumerate(regions):
            onehot[layout.region_slice(name), j] = 1.0
        self.onehot = onehot.to(self.device)  # (K, R)
        self.static_valid = torch.as_tensor(layout.static_key_valid()).to(self.device)  # (K,) bool
        cams = [layout.region_slice(c) for c, p in zip(layout.cameras, layout.camera_present) if p]
        self.num_cameras = len(cams)
        index = torch.cat([torch.arange(c.start, c.stop) for c in cams]) if cams else torch.zeros(0, dtype=torch.long)
        self.camera_keys = index.to(self.device)  # key positions of the present cameras' patches, in order
        self.language = layout.region_slice("language")
        # the log's buffer, reused call after call (an allocation costs a pass); one per thread: the CPU
        # staged path summarises on the writer thread while prefix hooks may run on the inference thread
        self._scratch = threading.local()

    def key_valid(self, language_mask) -> tuple[Any, Any]:
        """Per batch row, on the device: (B, K, R + 1) float32 region one-hot with the key validity as
        last column (one matmul gives every region's mass and the row's valid mass, the entropy's
        normaliser), and (B, K) float32 ``key_valid`` as 0/1 (contiguous, for the entropy's mask).
        """
        import torch

        mask = language_mask.to(self.device, torch.bool)
        valid = self.static_valid.expand(mask.shape[0], -1).clone()
        valid[:, self.language] = mask
        valid = valid.float()
        onehot = self.onehot.expand(mask.shape[0], -1, -1)
        return torch.cat([onehot, valid[..., None]], dim=-1), valid

    def expert(self, probs, rows) -> tuple[Any, Any, Any]:
        """Region mass (..., H, Q, R), entropy (..., H, Q) and camera grids (..., C, rows, cols), float32.

        ``probs``: (B, ..., H, Q, K) action-token attention (any float dtype; ``...`` e.g. layers);
        ``rows``: :meth:`key_valid` of the batch.
        """
        p = probs.float()
        mass, ent = _mass_entropy(p, *rows, self._buffer(p))
        lay = self.layout
        mean = p.mean(dim=(-3, -2))  # (B, ..., K): head-and-token mean
        grid = mean.index_select(-1, self.camera_keys)
        return mass, ent, grid.reshape(*mean.shape[:-1], self.num_cameras, lay.grid_rows, lay.grid_cols)

    def prefix(self, probs, rows) -> tuple[Any, Any]:
        """Region mass (B, H, P, R) and entropy (B, H, P) of the prefix queries' rows (VLM layers).

        ``probs``: (B, H, P, P) prefix self-attention; ``rows`` as for :meth:`expert` (first P keys used).
        """
        p = probs.float()
        n = p.shape[-1]
        weights, valid = rows
        return _mass_entropy(p, weights[:, :n], valid[:, :n], self._buffer(p))

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


def _mass_entropy(p, weights, valid, scratch):
    """Region mass and entropy (over the valid keys, renormalised) of each row of ``p`` (float32).

    Four passes over the keys: one matmul (region mass and valid mass s), a clamp and a log of p, one
    fused product-sum: H = log s - sum(valid p log p) / s. Zeros are clamped to the smallest normal
    float before the log (log(0) takes a slow path on CPUs) and contribute 0 * log(tiny) = 0.
    """
    import torch

    tiny = torch.finfo(torch.float32).tiny
    both = p @ _per_row(weights, p.ndim)
    mass, s = both[..., :-1], both[..., -1]
    logp = torch.clamp_min(p, tiny, out=scratch).log_().mul_(_per_row(valid, p.ndim).unsqueeze(-2))
    plogp = torch.einsum("...k,...k->...", p, logp)
    safe = s.clamp_min(tiny)
    ent = torch.where(s > 0, safe.log() - plogp / safe, torch.zeros_like(s))
    return mass, ent


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
