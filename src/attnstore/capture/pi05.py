"""Where lerobot 0.6.1's Pi0.5 computes what the recorder captures (its modules, by attribute path)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from attnstore.errors import CaptureError


def check_policy(policy) -> None:
    try:
        from lerobot.policies.pi05.modeling_pi05 import PI05Policy
    except ImportError as exc:  # pragma: no cover - the capture extra is missing
        raise CaptureError(f"capturing needs lerobot[pi]==0.6.1 ({exc}); run 'make setup'") from exc
    if not isinstance(policy, PI05Policy):
        raise CaptureError(
            f"AttentionRecorder records lerobot's Pi0.5 (PI05Policy); got {type(policy).__name__}"
        )


def expert_layers(policy) -> Sequence[Any]:
    return policy.model.paligemma_with_expert.gemma_expert.model.layers


def vlm_layers(policy) -> Sequence[Any]:
    return policy.model.paligemma_with_expert.paligemma.model.language_model.layers


def num_heads(policy) -> int:
    return int(policy.model.paligemma_with_expert.gemma_expert.config.num_attention_heads)
