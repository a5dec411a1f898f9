"""Analyses of an attention store (stubs; being implemented — names and signatures are stable)."""

from __future__ import annotations

from typing import Any

import xarray as xr


def aggregate(da: xr.DataArray, heads: Any = "mean", queries: Any = "mean", layers: Any = None,
              denoise: Any = None) -> xr.DataArray:
    raise NotImplementedError


def action_to_visual(ds_or_da: Any, camera: str, *, heads: Any = "mean", queries: Any = "mean",
                     renormalize: bool = False) -> xr.DataArray:
    raise NotImplementedError


def region_shares(ds_or_da: Any, *, heads: Any = "mean", queries: Any = "mean") -> xr.DataArray:
    raise NotImplementedError


def entropy(ds_or_da: Any, *, over: str = "keys", normalize: bool = False) -> xr.DataArray:
    raise NotImplementedError


def top_k_patches(ds_or_da: Any, camera: str, k: int = 5) -> xr.Dataset:
    raise NotImplementedError


def attention_rollout(ds: xr.Dataset, *, layers: Any = None, residual: float = 0.5, heads: Any = "mean") -> xr.DataArray:
    raise NotImplementedError
