"""readers/: lazy xarray views of a store and the analyses on them. Never imports model code.

``from attnstore.readers import action_to_visual`` works for every analysis in
:mod:`attnstore.readers.analysis`; names load on first use, so importing the package stays light.
"""

from __future__ import annotations

from typing import Any

_ANALYSES = (
    "action_to_visual",
    "aggregate",
    "attention_rollout",
    "entropy",
    "region_shares",
    "top_k_patches",
)
__all__ = sorted(_ANALYSES)


def __getattr__(name: str) -> Any:
    if name in _ANALYSES:
        from attnstore.readers import analysis

        return getattr(analysis, name)
    raise AttributeError(f"module 'attnstore.readers' has no attribute '{name}'")
