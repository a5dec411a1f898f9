"""load_policy: a Pi0.5, Pi0 or SmolVLA policy and its processors, ready for ``select_action``.

``"tiny"`` builds (once, cached) and loads the tiny random-weight model fully offline; a local
directory loads it (tiny checkpoints rebuilt tiny); anything else is a hub id handed to lerobot
unchanged (hub/offline settings are the user's). Resolving, the type check, the tiny patches, the
tokenizer override and the weight check are :mod:`attnstore.capture.checkpoint`'s, shared with
``attnstore eval``.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from attnstore.capture import checkpoint
from attnstore.capture.checkpoint import Checkpoint
from attnstore.capture.tokenizer import find_tokenizer

__all__ = ["find_tokenizer", "load_policy"]


def load_policy(path_or_id: str | os.PathLike[str], device: str = "cpu") -> tuple[Any, Any, Any]:
    """``(policy, preprocessor, postprocessor)`` for a Pi0.5, Pi0 or SmolVLA checkpoint, in eval mode on ``device``.

    ``"tiny"``: the cached tiny model, offline. Local tiny checkpoints are rebuilt tiny; every
    checkpoint's weights are checked against its model (:func:`checkpoint.check_weights_loaded`).
    """
    ckpt = checkpoint.resolve(path_or_id)
    with ckpt.hub_context():
        return _load(ckpt, device)


def _load(ckpt: Checkpoint, device: str) -> tuple[Any, Any, Any]:
    from lerobot.policies.factory import make_pre_post_processors

    from attnstore.capture.policies import adapter_class

    config = ckpt.read_config(device)
    policy_class = adapter_class(config.type).policy_class()
    with ckpt.model_patches(), contextlib.redirect_stdout(_NullWriter()):  # from_pretrained prints a banner
        policy = policy_class.from_pretrained(ckpt.source, config=config)
    ckpt.check_weights(policy)  # from_pretrained only warns on a mismatch
    policy.eval()
    preprocessor, postprocessor = make_pre_post_processors(
        policy_cfg=config,
        pretrained_path=ckpt.source,
        preprocessor_overrides=ckpt.processor_overrides({"device_processor": {"device": device}}),
    )
    return policy, preprocessor, postprocessor


class _NullWriter:
    def write(self, _text: str) -> int:
        return 0

    def flush(self) -> None:
        pass
