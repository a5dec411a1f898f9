"""Where lerobot 0.6.1's Pi0.5 computes what the recorder captures (its modules, by attribute path)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any



def check_policy(policy) -> None:
    """Refuse anything but lerobot's Pi0.5 in one line (the check lives in capture/checkpoint.py)."""
    from attnstore.capture.checkpoint import require_pi05

    require_pi05(policy, what="AttentionRecorder's policy")


def expert_layers(policy) -> Sequence[Any]:
    return policy.model.paligemma_with_expert.gemma_expert.model.layers


def vlm_layers(policy) -> Sequence[Any]:
    return policy.model.paligemma_with_expert.paligemma.model.language_model.layers


def num_heads(policy) -> int:
    return int(policy.model.paligemma_with_expert.gemma_expert.config.num_attention_heads)
