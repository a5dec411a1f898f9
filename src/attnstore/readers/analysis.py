"""Analyses of an attention store: one import point for what readers/ computes.

All of them take the Dataset from :func:`attnstore.open_attention` (or a DataArray of its attention
that kept its ``key`` coordinates), keep every leading dim the caller kept, and stay lazy (dask):

* :func:`aggregate` -- reduce/select heads, action tokens, layers, denoise steps;
* :func:`action_to_visual` -- one camera's (..., patch_row, patch_col) grid of attention shares;
* :func:`region_shares` -- share per region (each camera, ``language``, ``action``), summing to 1;
* :func:`entropy` -- Shannon entropy of each row over valid keys or over regions;
* :func:`top_k_patches` -- the k most attended patches of a camera, with their grid positions;
* :func:`attention_rollout` -- Abnar & Zuidema rollout over the captured VLM prefix layers,
  optionally carried on to the action tokens.
"""

from __future__ import annotations

from attnstore.readers.aggregate import aggregate, reduce_dim
from attnstore.readers.regions import (
    action_to_visual,
    camera_keys,
    entropy,
    region_shares,
    top_k_patches,
)
from attnstore.readers.rollout import attention_rollout

__all__ = [
    "action_to_visual",
    "aggregate",
    "attention_rollout",
    "camera_keys",
    "entropy",
    "reduce_dim",
    "region_shares",
    "top_k_patches",
]
