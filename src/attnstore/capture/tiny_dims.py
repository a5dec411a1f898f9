"""TinyDims: the sizes of the tiny random-weight Pi0.5 (and Pi0), and the LIBERO features the tiny policies take.

:mod:`attnstore.capture.tiny` builds the model from them; a tiny checkpoint's marker keeps them
(:mod:`attnstore.capture.tiny_marker`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from attnstore.errors import CaptureError

LIBERO_CAMERAS = ("image", "image2")
IMAGE_KEY_PREFIX = "observation.images."
LIBERO_STATE_DIM = 8
LIBERO_ACTION_DIM = 7


@dataclass(frozen=True)
class TinyDims:
    """Sizes of the tiny Pi0.5. VLM and expert must share depth, head_dim and KV heads (lerobot's
    joint attention concatenates their queries/keys); 8 heads are hard-coded in lerobot's reshapes.

    >>> TinyDims().siglip_tokens_per_camera
    256
    >>> TinyDims(num_heads=4)
    Traceback (most recent call last):
    ...
    attnstore.errors.CaptureError: tiny Pi0.5: num_heads must be 8 (lerobot reshapes attention to 8 heads), got 4
    """

    depth: int = 2
    num_heads: int = 8
    num_kv_heads: int = 1
    head_dim: int = 16
    vlm_width: int = 64
    vlm_mlp_dim: int = 128
    expert_width: int = 32
    expert_mlp_dim: int = 64
    siglip_width: int = 32
    siglip_mlp_dim: int = 64
    siglip_layers: int = 1
    siglip_heads: int = 2
    image_size: int = 224
    patch_size: int = 14

    def __post_init__(self) -> None:
        if self.num_heads != 8:
            raise CaptureError(
                f"tiny Pi0.5: num_heads must be 8 (lerobot reshapes attention to 8 heads), got {self.num_heads}"
            )
        for f in dataclasses.fields(self):
            if getattr(self, f.name) < 1:
                raise CaptureError(f"tiny Pi0.5: {f.name} must be >= 1, got {getattr(self, f.name)}")
        if self.image_size % self.patch_size:
            raise CaptureError(
                f"tiny Pi0.5: image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.siglip_width % self.siglip_heads:
            raise CaptureError(
                f"tiny Pi0.5: siglip_width {self.siglip_width} not divisible by siglip_heads {self.siglip_heads}"
            )

    @property
    def siglip_tokens_per_camera(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def gemma_config(self, variant: str, modeling_pi05: Any = None):
        """lerobot's ``GemmaConfig`` for a variant name, shrunk (``gemma_2b`` = VLM, ``gemma_300m`` = expert).

        ``modeling_pi05``: the lerobot module whose ``GemmaConfig`` to use (Pi0.5's by default, Pi0's for Pi0).
        """
        if modeling_pi05 is None:
            from lerobot.policies.pi05 import modeling_pi05

        widths = {
            "gemma_2b": (self.vlm_width, self.vlm_mlp_dim),
            "gemma_300m": (self.expert_width, self.expert_mlp_dim),
        }
        if variant not in widths:
            raise ValueError(f"Unknown variant: {variant}")
        width, mlp_dim = widths[variant]
        return modeling_pi05.GemmaConfig(
            width=width,
            depth=self.depth,
            mlp_dim=mlp_dim,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
        )

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TinyDims:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: int(v) for k, v in data.items() if k in names})
