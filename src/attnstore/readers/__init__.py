"""readers/: lazy xarray views of a store and the analyses on them. Never imports model code.

``from attnstore.readers import action_to_visual`` works for every analysis in
:mod:`attnstore.readers.analysis`; importing the package loads xarray (never model code).
"""

from __future__ import annotations

# Imported eagerly: ``readers/aggregate.py`` is also a submodule's name, and importing a submodule binds it on
# the package, so a lazy lookup would hand out the module instead of the function once anything imported it.
from attnstore.readers.analysis import (  # noqa: E402
    action_to_visual,
    aggregate,
    attention_rollout,
    entropy,
    region_shares,
    top_k_patches,
)

__all__ = sorted(["action_to_visual", "aggregate", "attention_rollout", "entropy", "region_shares", "top_k_patches"])
