"""The policies attnstore captures: one :class:`~attnstore.capture.policies.base.PolicyAdapter` per lerobot type.

=========  =====================================================  =================================
type       module                                                 lerobot class
=========  =====================================================  =================================
pi05       :mod:`attnstore.capture.policies.pi05`                 ``PI05Policy``
pi0        :mod:`attnstore.capture.policies.pi0`                  ``PI0Policy``
smolvla    :mod:`attnstore.capture.policies.smolvla`              ``SmolVLAPolicy``
=========  =====================================================  =================================

:func:`adapter_for` gives a policy's adapter (or one line listing the supported types); the recorder
goes through it for everything policy-specific. Adding a VLA is one module with an adapter class and one
line in :data:`REGISTRY`. Importing this package is cheap: the adapters (and torch) load when asked for.
"""

from __future__ import annotations

import importlib
from typing import Any

# lerobot policy type -> (adapter module, adapter class, name in messages); the order is the one messages list
REGISTRY: dict[str, tuple[str, str, str]] = {
    "pi05": ("attnstore.capture.policies.pi05", "Pi05Adapter", "Pi0.5"),
    "pi0": ("attnstore.capture.policies.pi0", "Pi0Adapter", "Pi0"),
    "smolvla": ("attnstore.capture.policies.smolvla", "SmolVLAAdapter", "SmolVLA"),
}
SUPPORTED_TYPES: tuple[str, ...] = tuple(REGISTRY)


def supported_labels() -> str:
    """The supported policies for messages.

    >>> supported_labels()
    'Pi0.5, Pi0 and SmolVLA'
    """
    labels = [label for _, _, label in REGISTRY.values()]
    return labels[0] if len(labels) == 1 else f"{', '.join(labels[:-1])} and {labels[-1]}"


def adapter_class(policy_type: str) -> type:
    """The adapter class of a supported lerobot policy type (``KeyError`` for others)."""
    module, name, _ = REGISTRY[policy_type]
    return getattr(importlib.import_module(module), name)


def policy_type_of(policy: Any) -> str | None:
    """The supported type ``policy`` is an instance of (lerobot's class of that type), else None."""
    for kind in SUPPORTED_TYPES:
        try:
            cls = adapter_class(kind).policy_class()
        except ImportError:  # pragma: no cover - that policy's lerobot extra is not installed
            continue
        if isinstance(policy, cls):
            return kind
    return None


def adapter_for(policy: Any, *, what: str = "AttentionRecorder's policy"):
    """The adapter of ``policy`` (lerobot's Pi0.5, Pi0 or SmolVLA); anything else fails in one line."""
    from attnstore.capture.checkpoint import require_supported

    require_supported(policy, what=what)
    kind = policy_type_of(policy)
    return adapter_class(kind)(policy)


__all__ = ["REGISTRY", "SUPPORTED_TYPES", "adapter_class", "adapter_for", "policy_type_of", "supported_labels"]
