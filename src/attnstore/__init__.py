"""attnstore: see where a Pi0.5 policy looks while it acts.

capture/ (hooks on an unmodified lerobot Pi0.5) -> store/ (a Zarr v3 attention store) -> readers/
(lazy xarray datasets and analyses). Heavy pieces import lazily, so ``import attnstore`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "open_attention": "attnstore.store.open",
    "open_study": "attnstore.store.study",
    "AttentionWriter": "attnstore.store.writer",
    "InferenceBatch": "attnstore.store.writer",
    "EpisodeRecord": "attnstore.schema",
    "StoreSpec": "attnstore.schema",
    "TokenLayout": "attnstore.schema",
    "AttentionRecorder": "attnstore.capture.recorder",
    "load_policy": "attnstore.capture.policy",
}

__all__ = [
    "AttentionRecorder",
    "AttentionWriter",
    "EpisodeRecord",
    "InferenceBatch",
    "StoreSpec",
    "TokenLayout",
    "load_policy",
    "open_attention",
    "open_study",
]

if TYPE_CHECKING:
    from attnstore.capture.policy import load_policy
    from attnstore.capture.recorder import AttentionRecorder
    from attnstore.store.open import open_attention
    from attnstore.store.study import open_study
    from attnstore.schema import EpisodeRecord, StoreSpec, TokenLayout
    from attnstore.store.writer import AttentionWriter, InferenceBatch


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'attnstore' has no attribute '{name}'")
