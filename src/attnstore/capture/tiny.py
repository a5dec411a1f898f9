"""A tiny, random-weight Pi0.5 built through lerobot's own classes, for tests, CI and benchmarks.

(Pi0 and SmolVLA have theirs in :mod:`attnstore.capture.tiny_pi0` and :mod:`attnstore.capture.tiny_smolvla`;
:func:`make_tiny_policy` ``policy_type=`` and :func:`tiny_model_patches` dispatch to them, a checkpoint's
marker says which it is.)

lerobot 0.6.1 accepts only the variant names ``gemma_2b`` / ``gemma_300m`` and hard-codes SigLIP's
size, so a tiny model cannot be described by a config alone. :func:`tiny_model_patches` swaps two
module globals of ``lerobot.policies.pi05.modeling_pi05`` (``get_gemma_config`` and
``PaliGemmaForConditionalGenerationWithPiGemma``) while a policy is built, so lerobot's OWN code
paths (``PI05Policy(config)``, ``PI05Policy.from_pretrained``, ``lerobot.policies.factory.make_policy``
as used by lerobot-eval) build it small. Everything else (processors, normaliser, tokenizer step,
attention code) is lerobot's unchanged.

A tiny checkpoint is a normal ``--policy.path`` directory plus a marker file
(:data:`MARKER_NAME`) holding its dims, so loaders know to rebuild it tiny, and its own offline
tokenizer (:mod:`attnstore.capture.tokenizer`). Without the patches, ``from_pretrained`` on it would
only warn and return a random FULL-SIZE model: the weight check of :mod:`attnstore.capture.checkpoint`
turns that trap into a one-line :class:`~attnstore.errors.CaptureError`.

Here: the patches and the building; the sizes are :mod:`attnstore.capture.tiny_dims`, the marker
:mod:`attnstore.capture.tiny_marker` (their names importable from here, as before).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from attnstore.capture.tiny_dims import (
    IMAGE_KEY_PREFIX,
    LIBERO_ACTION_DIM,
    LIBERO_CAMERAS,
    LIBERO_STATE_DIM,
    TinyDims,
)
from attnstore.capture.tiny_marker import (
    MARKER_NAME,
    TOKENIZER_DIRNAME,
    is_tiny_checkpoint,
    read_marker,
    read_tiny_dims,
    tiny_depths,
    tiny_policy_type,
    tokenizer_dir,
)
from attnstore.capture.tokenizer import local_tokenizer_step, write_offline_tokenizer
from attnstore.errors import CaptureError

__all__ = [
    "IMAGE_KEY_PREFIX", "LIBERO_ACTION_DIM", "LIBERO_CAMERAS", "LIBERO_STATE_DIM", "MARKER_NAME", "TINY_TYPES",
    "TOKENIZER_DIRNAME", "TinyDims", "build_tiny_policy", "example_model_batch", "is_tiny_checkpoint",
    "make_tiny_policy", "paligemma_patches", "read_marker", "read_tiny_dims", "tiny_config", "tiny_depths",
    "tiny_model_patches", "tiny_policy_type", "tokenizer_dir",
]

TINY_TYPES = ("pi05", "pi0", "smolvla")  # policy types make_tiny_policy builds


# ---- patches --------------------------------------------------------------------------------------
@contextlib.contextmanager
def tiny_model_patches(source: str | os.PathLike[str] | TinyDims | None = None) -> Iterator[TinyDims]:
    """Make lerobot's own Pi0.5 building code build the tiny model while the context is open.

    ``source`` is a tiny checkpoint directory (its marker's dims), a :class:`TinyDims`, or None
    (default dims). Patches ``modeling_pi05.get_gemma_config`` and
    ``modeling_pi05.PaliGemmaForConditionalGenerationWithPiGemma``; the originals are restored on
    exit, also after an exception. Models built inside stay tiny after exit. A tiny Pi0 or SmolVLA
    checkpoint directory gets its own module's patches (:mod:`attnstore.capture.tiny_pi0`,
    :mod:`attnstore.capture.tiny_smolvla`).
    """
    if source is None:
        dims = TinyDims()
    elif isinstance(source, TinyDims):
        dims = source
    else:
        if not is_tiny_checkpoint(source):
            raise CaptureError(f"{source} is not a tiny attnstore checkpoint (no {MARKER_NAME})")
        kind = tiny_policy_type(source)
        if kind != "pi05":
            with _other_type_patches(kind, source) as other:
                yield other
            return
        dims = read_tiny_dims(source)

    from lerobot.policies.pi05 import modeling_pi05

    with paligemma_patches(modeling_pi05, dims):
        yield dims


def _other_type_patches(kind: str, source: str | os.PathLike[str]) -> contextlib.AbstractContextManager[Any]:
    if kind == "pi0":
        from attnstore.capture.tiny_pi0 import tiny_model_patches as patches
    elif kind == "smolvla":
        from attnstore.capture.tiny_smolvla import tiny_model_patches as patches
    else:
        raise CaptureError(f"{source}: tiny checkpoint of unknown policy type '{kind}'; rebuild it")
    return patches(source)


@contextlib.contextmanager
def paligemma_patches(modeling_pi05: Any, dims: TinyDims) -> Iterator[TinyDims]:
    """Patch ``get_gemma_config`` and ``PaliGemmaForConditionalGenerationWithPiGemma`` of a lerobot
    PaliGemma policy module (``modeling_pi05`` or ``modeling_pi0``) to build ``dims``' tiny model."""
    original_cfg = modeling_pi05.get_gemma_config
    original_paligemma = modeling_pi05.PaliGemmaForConditionalGenerationWithPiGemma

    def get_gemma_config(variant: str):
        return dims.gemma_config(variant, modeling_pi05)

    class TinySiglipPaliGemma(original_paligemma):
        """lerobot's PaliGemma with a small SigLIP (same patch grid, so 256 tokens per camera)."""

        def __init__(self, config):
            vision = config.vision_config
            vision.hidden_size = dims.siglip_width
            vision.intermediate_size = dims.siglip_mlp_dim
            vision.num_hidden_layers = dims.siglip_layers
            vision.num_attention_heads = dims.siglip_heads
            vision.patch_size = dims.patch_size
            vision.image_size = dims.image_size
            # the projector maps SigLIP features into the language model's width
            vision.projection_dim = config.text_config.hidden_size
            config.projection_dim = config.text_config.hidden_size
            config.text_config.num_image_tokens = dims.siglip_tokens_per_camera
            super().__init__(config)

    TinySiglipPaliGemma.__name__ = original_paligemma.__name__
    TinySiglipPaliGemma.__qualname__ = original_paligemma.__qualname__
    modeling_pi05.get_gemma_config = get_gemma_config
    modeling_pi05.PaliGemmaForConditionalGenerationWithPiGemma = TinySiglipPaliGemma
    try:
        yield dims
    finally:
        modeling_pi05.get_gemma_config = original_cfg
        modeling_pi05.PaliGemmaForConditionalGenerationWithPiGemma = original_paligemma


# ---- building -------------------------------------------------------------------------------------
def make_tiny_policy(
    directory: str | os.PathLike[str],
    seed: int = 0,
    *,
    cameras: Sequence[str] = LIBERO_CAMERAS,
    empty_cameras: int = 1,
    dims: Any = None,
    n_action_steps: int = 10,
    policy_type: str = "pi05",
) -> Path:
    """Write a tiny random-weight Pi0.5 checkpoint to ``directory`` (a normal ``--policy.path``).

    Defaults mirror the LIBERO Pi0.5 checkpoints: cameras ``observation.images.image`` and
    ``observation.images.image2`` (3x256x256), one empty camera, state 8, action 7, chunk 50,
    ``n_action_steps`` 10, 10 denoise steps, 200 language tokens, QUANTILES normalisation. The same
    seed gives the same weights. Returns the directory. ``policy_type="pi0"`` / ``"smolvla"`` writes a
    tiny Pi0 / SmolVLA instead (:mod:`attnstore.capture.tiny_pi0`, :mod:`attnstore.capture.tiny_smolvla`).
    """
    if policy_type not in TINY_TYPES:
        raise CaptureError(f"tiny policy type must be one of {', '.join(TINY_TYPES)}, got '{policy_type}'")
    if policy_type != "pi05":
        if policy_type == "pi0":
            from attnstore.capture.tiny_pi0 import make_tiny_policy as make
        else:
            from attnstore.capture.tiny_smolvla import make_tiny_policy as make
        return make(directory, seed, cameras=cameras, empty_cameras=empty_cameras, dims=dims,
                    n_action_steps=n_action_steps)
    cameras = tuple(cameras)
    dims = dims or TinyDims()
    out = Path(directory).expanduser().resolve()
    if out.exists() and any(out.iterdir()) and not is_tiny_checkpoint(out):
        raise CaptureError(f"{out} exists and is not a tiny attnstore checkpoint; choose an empty directory")
    config = tiny_config(cameras, empty_cameras=empty_cameras, dims=dims, n_action_steps=n_action_steps)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = write_offline_tokenizer(out / TOKENIZER_DIRNAME)
    policy = build_tiny_policy(config, seed=seed, dims=dims)
    policy.save_pretrained(out)

    stats = _libero_like_stats()
    pre, post = _make_processors(policy.config, stats, tokenizer_dir)
    pre.save_pretrained(out)
    post.save_pretrained(out)
    marker = {
        "format": "attnstore.tiny_pi05",
        "policy_type": "pi05",
        "seed": int(seed),
        "cameras": list(cameras),
        "empty_cameras": int(empty_cameras),
        "dims": dims.to_dict(),
        "note": "random weights; load with attnstore.capture.load_policy or inside tiny_model_patches()",
    }
    (out / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")
    return out


def tiny_config(
    cameras: Sequence[str] = LIBERO_CAMERAS,
    *,
    empty_cameras: int = 1,
    dims: TinyDims | None = None,
    n_action_steps: int = 10,
):
    """lerobot's ``PI05Config`` with LIBERO's features for the given camera names (CPU, float32)."""
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.pi05.configuration_pi05 import PI05Config

    cameras = tuple(cameras)
    if not cameras:
        raise CaptureError("tiny Pi0.5: at least one camera is needed")
    if empty_cameras < 0:
        raise CaptureError(f"tiny Pi0.5: empty_cameras must be >= 0, got {empty_cameras}")
    dims = dims or TinyDims()
    input_features = {
        f"{IMAGE_KEY_PREFIX}{cam}": PolicyFeature(type=FeatureType.VISUAL, shape=(3, 256, 256)) for cam in cameras
    }
    input_features["observation.state"] = PolicyFeature(type=FeatureType.STATE, shape=(LIBERO_STATE_DIM,))
    return PI05Config(
        input_features=input_features,
        output_features={"action": PolicyFeature(type=FeatureType.ACTION, shape=(LIBERO_ACTION_DIM,))},
        empty_cameras=empty_cameras,
        chunk_size=50,
        n_action_steps=n_action_steps,
        num_inference_steps=10,
        tokenizer_max_length=200,
        image_resolution=(dims.image_size, dims.image_size),
        device="cpu",
        dtype="float32",
        push_to_hub=False,
    )


def build_tiny_policy(config, *, seed: int = 0, dims: TinyDims | None = None):
    """A tiny ``PI05Policy`` in memory (weights from ``seed``; the global RNG is left untouched)."""
    import torch
    from lerobot.policies.pi05.modeling_pi05 import PI05Policy

    with torch.random.fork_rng(devices=[]), tiny_model_patches(dims or TinyDims()):
        torch.manual_seed(seed)
        policy = PI05Policy(config)
    return policy.eval()


def example_model_batch(batch_size: int = 1, *, num_valid_tokens: int = 48, seed: int = 0) -> dict[str, Any]:
    """A batch as Pi0.5's preprocessor hands it to the model (LIBERO cameras, tokenised prompt).

    For smoke tests and benchmarks that call ``policy.select_action`` without an environment: a LIBERO
    prompt with its state string is ~40-60 tokens, so ``num_valid_tokens`` of the 200 are unmasked.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch_size, 200, dtype=torch.bool)
    mask[:, :num_valid_tokens] = True
    return {
        "observation.images.image": torch.rand(batch_size, 3, 224, 224, generator=g),
        "observation.images.image2": torch.rand(batch_size, 3, 224, 224, generator=g),
        "observation.state": torch.zeros(batch_size, 8),
        "observation.language.tokens": torch.randint(4, 500, (batch_size, 200), generator=g),
        "observation.language.attention_mask": mask,
    }


def _libero_like_stats() -> dict[str, dict[str, Any]]:
    """Made-up but plausible LIBERO normalisation stats (q01/q99 are what QUANTILES uses)."""
    import torch

    state_q01 = [-0.4, -0.3, 0.0, 1.5, -1.5, -0.5, 0.0, -0.04]
    state_q99 = [0.2, 0.4, 1.3, 3.3, 1.5, 0.5, 0.04, 0.0]
    action_q01 = [-0.9, -0.9, -0.9, -0.2, -0.3, -0.4, -1.0]
    action_q99 = [0.9, 0.9, 0.9, 0.2, 0.3, 0.4, 1.0]

    def entry(q01: list[float], q99: list[float]) -> dict[str, Any]:
        lo, hi = torch.tensor(q01), torch.tensor(q99)
        return {
            "q01": lo,
            "q99": hi,
            "min": lo - 0.1,
            "max": hi + 0.1,
            "mean": (lo + hi) / 2,
            "std": (hi - lo) / 4,
        }

    return {"observation.state": entry(state_q01, state_q99), "action": entry(action_q01, action_q99)}


def _make_processors(config, stats, tokenizer_dir: Path, processor_module: str = "lerobot.policies.pi05.processor_pi05"):
    """lerobot's processors of ``config``'s policy, with the tokenizer step pointed at the local tokenizer.

    lerobot hard-codes ``google/paligemma-3b-pt-224`` (a hub download); the step is swapped for the
    same class with the local path only while the pipelines are built.
    """
    from lerobot.policies import factory

    with local_tokenizer_step(tokenizer_dir, processor_module):
        return factory.make_pre_post_processors(config, dataset_stats=stats)
