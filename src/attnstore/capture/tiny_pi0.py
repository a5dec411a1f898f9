"""A tiny, random-weight Pi0 built through lerobot's own classes (as :mod:`attnstore.capture.tiny` for Pi0.5).

lerobot's Pi0 shares Pi0.5's PaliGemma + Gemma-expert construction in its own module
(``lerobot.policies.pi0.modeling_pi0``), so the same two module globals (``get_gemma_config``,
``PaliGemmaForConditionalGenerationWithPiGemma``) are patched there while a policy is built; the
processors (Pi0's, with ``google/paligemma-3b-pt-224`` swapped for the checkpoint's offline tokenizer),
the normaliser (MEAN_STD for state and action) and the attention code are lerobot's unchanged. Sizes are
:class:`~attnstore.capture.tiny.TinyDims` (2 layers, 8 heads, 224 px / patch 14 = 256 tokens per camera).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from attnstore.capture import tiny
from attnstore.capture.tiny import (
    IMAGE_KEY_PREFIX,
    LIBERO_ACTION_DIM,
    LIBERO_CAMERAS,
    LIBERO_STATE_DIM,
    MARKER_NAME,
    TOKENIZER_DIRNAME,
    TinyDims,
)
from attnstore.capture.tokenizer import write_offline_tokenizer
from attnstore.errors import CaptureError

PROCESSOR_MODULE = "lerobot.policies.pi0.processor_pi0"
TOKENIZER_MAX_LENGTH = 48  # PI0Config's default (openpi)


@contextlib.contextmanager
def tiny_model_patches(source: str | os.PathLike[str] | TinyDims | None = None) -> Iterator[TinyDims]:
    """Make lerobot's own Pi0 building code build the tiny model while the context is open.

    ``source``: a tiny Pi0 checkpoint directory, a :class:`TinyDims` or None (default dims).
    """
    if source is None or isinstance(source, TinyDims):
        dims = source or TinyDims()
    else:
        if tiny.tiny_policy_type(source) != "pi0":
            raise CaptureError(f"{source} is not a tiny Pi0 checkpoint")
        dims = tiny.read_tiny_dims(source)
    from lerobot.policies.pi0 import modeling_pi0

    with tiny.paligemma_patches(modeling_pi0, dims):
        yield dims


def tiny_config(
    cameras: Sequence[str] = LIBERO_CAMERAS,
    *,
    empty_cameras: int = 1,
    dims: TinyDims | None = None,
    n_action_steps: int = 10,
):
    """lerobot's ``PI0Config`` with LIBERO's features for the given camera names (CPU, float32)."""
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.pi0.configuration_pi0 import PI0Config

    cameras = tuple(cameras)
    if not cameras:
        raise CaptureError("tiny Pi0: at least one camera is needed")
    if empty_cameras < 0:
        raise CaptureError(f"tiny Pi0: empty_cameras must be >= 0, got {empty_cameras}")
    dims = dims or TinyDims()
    input_features = {
        f"{IMAGE_KEY_PREFIX}{cam}": PolicyFeature(type=FeatureType.VISUAL, shape=(3, 256, 256)) for cam in cameras
    }
    input_features["observation.state"] = PolicyFeature(type=FeatureType.STATE, shape=(LIBERO_STATE_DIM,))
    return PI0Config(
        input_features=input_features,
        output_features={"action": PolicyFeature(type=FeatureType.ACTION, shape=(LIBERO_ACTION_DIM,))},
        empty_cameras=empty_cameras,
        chunk_size=50,
        n_action_steps=n_action_steps,
        num_inference_steps=10,
        tokenizer_max_length=TOKENIZER_MAX_LENGTH,
        image_resolution=(dims.image_size, dims.image_size),
        device="cpu",
        dtype="float32",
        push_to_hub=False,
    )


def build_tiny_policy(config, *, seed: int = 0, dims: TinyDims | None = None):
    """A tiny ``PI0Policy`` in memory (weights from ``seed``; the global RNG is left untouched)."""
    import torch
    from lerobot.policies.pi0.modeling_pi0 import PI0Policy

    with torch.random.fork_rng(devices=[]), tiny_model_patches(dims or TinyDims()):
        torch.manual_seed(seed)
        policy = PI0Policy(config)
    return policy.eval()


def make_tiny_policy(
    directory: str | os.PathLike[str],
    seed: int = 0,
    *,
    cameras: Sequence[str] = LIBERO_CAMERAS,
    empty_cameras: int = 1,
    dims: TinyDims | None = None,
    n_action_steps: int = 10,
) -> Path:
    """Write a tiny random-weight Pi0 checkpoint to ``directory`` (a normal ``--policy.path``).

    LIBERO's features as the tiny Pi0.5 (cameras ``image``, ``image2`` + one empty camera, state 8,
    action 7, chunk 50, ``n_action_steps`` 10, 10 denoise steps), Pi0's 48 language tokens, MEAN_STD
    normalisation. The same seed gives the same weights. Returns the directory.
    """
    cameras = tuple(cameras)
    dims = dims or TinyDims()
    out = Path(directory).expanduser().resolve()
    if out.exists() and any(out.iterdir()) and not tiny.is_tiny_checkpoint(out):
        raise CaptureError(f"{out} exists and is not a tiny attnstore checkpoint; choose an empty directory")
    config = tiny_config(cameras, empty_cameras=empty_cameras, dims=dims, n_action_steps=n_action_steps)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = write_offline_tokenizer(out / TOKENIZER_DIRNAME)
    policy = build_tiny_policy(config, seed=seed, dims=dims)
    policy.save_pretrained(out)
    pre, post = tiny._make_processors(policy.config, tiny._libero_like_stats(), tokenizer_dir, PROCESSOR_MODULE)
    pre.save_pretrained(out)
    post.save_pretrained(out)
    marker = {
        "format": "attnstore.tiny_pi0",
        "policy_type": "pi0",
        "seed": int(seed),
        "cameras": list(cameras),
        "empty_cameras": int(empty_cameras),
        "dims": dims.to_dict(),
        "note": "random weights; load with attnstore.capture.load_policy or inside tiny_model_patches()",
    }
    (out / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")
    return out


def example_model_batch(batch_size: int = 1, *, num_valid_tokens: int = 16, seed: int = 0) -> dict[str, Any]:
    """A batch as Pi0's preprocessor hands it to the model (LIBERO cameras, 48 prompt tokens)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch_size, TOKENIZER_MAX_LENGTH, dtype=torch.bool)
    mask[:, :num_valid_tokens] = True
    return {
        "observation.images.image": torch.rand(batch_size, 3, 224, 224, generator=g),
        "observation.images.image2": torch.rand(batch_size, 3, 224, 224, generator=g),
        "observation.state": torch.zeros(batch_size, LIBERO_STATE_DIM),
        "observation.language.tokens": torch.randint(4, 500, (batch_size, TOKENIZER_MAX_LENGTH), generator=g),
        "observation.language.attention_mask": mask,
    }
