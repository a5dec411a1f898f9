"""A tiny, random-weight SmolVLA built through lerobot's own classes, offline.

lerobot's SmolVLA builds its VLM from a hub id (``config.vlm_model_name``: ``AutoConfig`` +
``SmolVLMForConditionalGeneration`` with random weights when ``load_vlm_weights`` is false, and
``AutoProcessor`` for its image tokens). A tiny checkpoint carries a tiny SmolVLM2 instead, in its
``vlm/`` folder: a transformers ``SmolVLMConfig`` with tiny sizes (SigLIP-like vision tower at 512 px,
patch 16, pixel-shuffle scale 4 = 8 x 8 = 64 tokens per camera, as SmolVLA's own 512 px input gives;
a 4-layer Llama text model), and an offline processor (SmolVLM image processor + a small tokenizer with
SmolVLM2's special tokens, :func:`attnstore.capture.tokenizer.offline_smolvlm_tokenizer`).

:func:`tiny_model_patches` swaps one module global, ``modeling_smolvla.SmolVLMWithExpertModel``, for the
same class built from that folder while a policy is built, so lerobot's OWN code paths
(``SmolVLAPolicy(config)``, ``from_pretrained``, ``make_policy`` as lerobot-eval uses it) build it tiny;
the checkpoint's ``config.json`` keeps lerobot's default ``vlm_model_name``. Processors (the tokenizer step
pointed at ``vlm/``), normaliser and attention code are lerobot's unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnstore.capture import tiny
from attnstore.capture.tiny import (
    IMAGE_KEY_PREFIX,
    LIBERO_ACTION_DIM,
    LIBERO_CAMERAS,
    LIBERO_STATE_DIM,
    MARKER_NAME,
)
from attnstore.capture.tokenizer import offline_smolvlm_tokenizer
from attnstore.errors import CaptureError

VLM_DIRNAME = "vlm"  # the tiny SmolVLM2 (config, processor, tokenizer) inside a tiny checkpoint
PROCESSOR_MODULE = "lerobot.policies.smolvla.processor_smolvla"
TOKENIZER_MAX_LENGTH = 48  # SmolVLAConfig's default


@dataclass(frozen=True)
class TinySmolDims:
    """Sizes of the tiny SmolVLA's VLM (the expert is lerobot's: ``expert_width_multiplier`` x width).

    >>> TinySmolDims().tokens_per_camera
    64
    >>> TinySmolDims(image_size=500)
    Traceback (most recent call last):
    ...
    attnstore.errors.CaptureError: tiny SmolVLA: image_size 500 is not a multiple of patch_size x scale_factor (64)
    """

    depth: int = 4  # VLM text layers = expert layers: self-attention at 0, 2, cross-attention at 1, 3
    width: int = 64
    mlp_dim: int = 128
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    vision_width: int = 32
    vision_mlp_dim: int = 64
    vision_layers: int = 1
    vision_heads: int = 2
    image_size: int = 512
    patch_size: int = 16
    scale_factor: int = 4

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if getattr(self, f.name) < 1:
                raise CaptureError(f"tiny SmolVLA: {f.name} must be >= 1, got {getattr(self, f.name)}")
        step = self.patch_size * self.scale_factor
        if self.image_size % step:
            raise CaptureError(
                f"tiny SmolVLA: image_size {self.image_size} is not a multiple of patch_size x scale_factor ({step})"
            )
        if self.num_heads % self.num_kv_heads or self.vision_width % self.vision_heads:
            raise CaptureError("tiny SmolVLA: heads must divide evenly (num_heads / num_kv_heads, vision)")

    @property
    def tokens_per_camera(self) -> int:
        return (self.image_size // self.patch_size // self.scale_factor) ** 2

    def vlm_config(self, tokenizer: Any):
        """The transformers ``SmolVLMConfig`` of the tiny VLM (vocabulary = the tokenizer's)."""
        from transformers import SmolVLMConfig

        return SmolVLMConfig(
            vision_config={
                "hidden_size": self.vision_width,
                "intermediate_size": self.vision_mlp_dim,
                "num_hidden_layers": self.vision_layers,
                "num_attention_heads": self.vision_heads,
                "image_size": self.image_size,
                "patch_size": self.patch_size,
            },
            text_config={
                "model_type": "llama",
                "hidden_size": self.width,
                "intermediate_size": self.mlp_dim,
                "num_hidden_layers": self.depth,
                "num_attention_heads": self.num_heads,
                "num_key_value_heads": self.num_kv_heads,
                "head_dim": self.head_dim,
                "vocab_size": len(tokenizer),
                "pad_token_id": tokenizer.pad_token_id,
            },
            scale_factor=self.scale_factor,
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
            pad_token_id=tokenizer.pad_token_id,
        )

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TinySmolDims:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: int(v) for k, v in data.items() if k in names})


def write_tiny_vlm(directory: str | os.PathLike[str], dims: TinySmolDims | None = None) -> Path:
    """Save the tiny SmolVLM2's config and offline processor (tokenizer + image processor) to ``directory``."""
    from transformers import SmolVLMImageProcessor, SmolVLMProcessor, SmolVLMVideoProcessor

    dims = dims or TinySmolDims()
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = offline_smolvlm_tokenizer()
    side = {"longest_edge": dims.image_size}
    processor = SmolVLMProcessor(
        image_processor=SmolVLMImageProcessor(do_image_splitting=False, size=side, max_image_size=side),
        tokenizer=tokenizer,
        video_processor=SmolVLMVideoProcessor(),
        image_seq_len=dims.tokens_per_camera,
    )
    processor.save_pretrained(str(out))
    dims.vlm_config(tokenizer).save_pretrained(str(out))
    return out


@contextlib.contextmanager
def tiny_model_patches(
    source: str | os.PathLike[str] | None = None, *, vlm_dir: str | os.PathLike[str] | None = None
) -> Iterator[TinySmolDims | None]:
    """Make lerobot's own SmolVLA building code build its VLM from a tiny SmolVLM2 folder.

    ``source``: a tiny SmolVLA checkpoint directory (its ``vlm/``), or ``vlm_dir=`` a folder from
    :func:`write_tiny_vlm`. Patches ``modeling_smolvla.SmolVLMWithExpertModel``; restored on exit.
    """
    dims = None
    if source is not None:
        if tiny.tiny_policy_type(source) != "smolvla":
            raise CaptureError(f"{source} is not a tiny SmolVLA checkpoint")
        dims = tiny.read_tiny_dims(source)
        vlm_dir = tiny.tokenizer_dir(source)
    if vlm_dir is None:
        raise CaptureError("tiny SmolVLA: pass its checkpoint directory or the tiny VLM's folder")
    if not (Path(vlm_dir) / "config.json").is_file():
        raise CaptureError(f"{vlm_dir} holds no tiny SmolVLM2 (no config.json); rebuild the tiny SmolVLA")

    from lerobot.policies.smolvla import modeling_smolvla

    original = modeling_smolvla.SmolVLMWithExpertModel

    class TinySmolVLMWithExpertModel(original):
        """lerobot's SmolVLM + expert, its VLM built from the tiny folder (random weights, offline)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["model_id"] = str(vlm_dir)
            kwargs["load_vlm_weights"] = False
            with contextlib.redirect_stdout(_Null()):  # lerobot prints "Reducing the number of VLM layers"
                super().__init__(*args, **kwargs)

    TinySmolVLMWithExpertModel.__name__ = original.__name__
    TinySmolVLMWithExpertModel.__qualname__ = original.__qualname__
    modeling_smolvla.SmolVLMWithExpertModel = TinySmolVLMWithExpertModel
    try:
        yield dims
    finally:
        modeling_smolvla.SmolVLMWithExpertModel = original


def tiny_config(
    cameras: Sequence[str] = LIBERO_CAMERAS,
    *,
    empty_cameras: int = 1,
    dims: TinySmolDims | None = None,
    n_action_steps: int = 10,
    **overrides: Any,
):
    """lerobot's ``SmolVLAConfig`` with LIBERO's features (CPU); ``overrides`` set other config fields
    (e.g. ``add_image_special_tokens=True``, ``prefix_length=...``)."""
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig

    cameras = tuple(cameras)
    if not cameras:
        raise CaptureError("tiny SmolVLA: at least one camera is needed")
    if empty_cameras < 0:
        raise CaptureError(f"tiny SmolVLA: empty_cameras must be >= 0, got {empty_cameras}")
    dims = dims or TinySmolDims()
    input_features = {
        f"{IMAGE_KEY_PREFIX}{cam}": PolicyFeature(type=FeatureType.VISUAL, shape=(3, 256, 256)) for cam in cameras
    }
    input_features["observation.state"] = PolicyFeature(type=FeatureType.STATE, shape=(LIBERO_STATE_DIM,))
    fields = {
        "input_features": input_features,
        "output_features": {"action": PolicyFeature(type=FeatureType.ACTION, shape=(LIBERO_ACTION_DIM,))},
        "empty_cameras": empty_cameras,
        "chunk_size": 50,
        "n_action_steps": n_action_steps,
        "num_steps": 10,
        "tokenizer_max_length": TOKENIZER_MAX_LENGTH,
        "resize_imgs_with_padding": (dims.image_size, dims.image_size),
        "load_vlm_weights": False,
        "num_vlm_layers": dims.depth,
        "device": "cpu",
        "push_to_hub": False,
    }
    fields.update(overrides)
    return SmolVLAConfig(**fields)


def build_tiny_policy(config, vlm_dir: str | os.PathLike[str], *, seed: int = 0):
    """A tiny ``SmolVLAPolicy`` in memory, its VLM from ``vlm_dir`` (weights from ``seed``; global RNG untouched)."""
    import torch
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    with torch.random.fork_rng(devices=[]), tiny_model_patches(vlm_dir=vlm_dir):
        torch.manual_seed(seed)
        policy = SmolVLAPolicy(config)
    return policy.eval()


def make_tiny_policy(
    directory: str | os.PathLike[str],
    seed: int = 0,
    *,
    cameras: Sequence[str] = LIBERO_CAMERAS,
    empty_cameras: int = 1,
    dims: TinySmolDims | None = None,
    n_action_steps: int = 10,
) -> Path:
    """Write a tiny random-weight SmolVLA checkpoint to ``directory`` (a normal ``--policy.path``).

    LIBERO's features (cameras ``image``, ``image2`` + one empty camera, state 8, action 7), chunk 50,
    ``n_action_steps`` 10, 10 denoise steps, SmolVLA's defaults otherwise (48-token prompts padded to the
    longest, 512 px images, cross-attention every other expert layer, MEAN_STD normalisation). The same
    seed gives the same weights. Returns the directory.
    """
    cameras = tuple(cameras)
    dims = dims or TinySmolDims()
    out = Path(directory).expanduser().resolve()
    if out.exists() and any(out.iterdir()) and not tiny.is_tiny_checkpoint(out):
        raise CaptureError(f"{out} exists and is not a tiny attnstore checkpoint; choose an empty directory")
    config = tiny_config(cameras, empty_cameras=empty_cameras, dims=dims, n_action_steps=n_action_steps)
    out.mkdir(parents=True, exist_ok=True)
    vlm_dir = write_tiny_vlm(out / VLM_DIRNAME, dims)
    policy = build_tiny_policy(config, vlm_dir, seed=seed)
    policy.save_pretrained(out)
    pre, post = tiny._make_processors(policy.config, tiny._libero_like_stats(), vlm_dir, PROCESSOR_MODULE)
    pre.save_pretrained(out)
    post.save_pretrained(out)
    marker = {
        "format": "attnstore.tiny_smolvla",
        "policy_type": "smolvla",
        "seed": int(seed),
        "cameras": list(cameras),
        "empty_cameras": int(empty_cameras),
        "dims": dims.to_dict(),
        "tokenizer_dir": VLM_DIRNAME,
        "note": "random weights; load with attnstore.capture.load_policy or inside tiny_model_patches()",
    }
    (out / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")
    return out


def example_model_batch(batch_size: int = 1, *, num_tokens: int = 16, seed: int = 0) -> dict[str, Any]:
    """A batch as SmolVLA's preprocessor hands it to the model (LIBERO cameras, a prompt padded to the
    longest: ``num_tokens``, the later rows' prompts shorter by 2 tokens each)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch_size, num_tokens, dtype=torch.bool)
    for i in range(batch_size):
        mask[i, : max(1, num_tokens - 2 * i)] = True
    return {
        "observation.images.image": torch.rand(batch_size, 3, 256, 256, generator=g),
        "observation.images.image2": torch.rand(batch_size, 3, 256, 256, generator=g),
        "observation.state": torch.zeros(batch_size, LIBERO_STATE_DIM),
        "observation.language.tokens": torch.randint(10, 250, (batch_size, num_tokens), generator=g),
        "observation.language.attention_mask": mask,
    }


class _Null:
    def write(self, _text: str) -> int:
        return 0

    def flush(self) -> None:
        pass
