"""Policy-neutral helpers for the key axis: camera slots, key validity, policy images, token text.

Each policy's own layout (which key is which token) is its adapter's
(:meth:`attnstore.capture.policies.base.PolicyAdapter.token_layout`, e.g. Pi0.5's
``[256 patches per camera slot | language tokens | action tokens]``); :func:`token_layout` here asks it.
Camera slots follow lerobot's image preprocessing: cameras present in the batch first (config order),
missing ones after, filled with -1 and masked. Nothing here re-implements the policy's image
preprocessing: the recorder hands over the tensors the policy's images method returned.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from attnstore.errors import CaptureError
from attnstore.schema import TokenLayout

IMAGE_KEY_PREFIX = "observation.images."


def camera_name(feature_key: str) -> str:
    """Short camera name of an image feature key.

    >>> camera_name("observation.images.image2"), camera_name("observation.images.empty_camera_0")
    ('image2', 'empty_camera_0')
    """
    return feature_key[len(IMAGE_KEY_PREFIX) :] if feature_key.startswith(IMAGE_KEY_PREFIX) else feature_key


def camera_slots(image_feature_keys: Sequence[str], batch_keys: Any) -> tuple[tuple[str, ...], tuple[bool, ...]]:
    """Camera names in the order the policy embeds them, and which are present.

    >>> camera_slots(["observation.images.image", "observation.images.image2",
    ...               "observation.images.image3"], {"observation.images.image", "observation.images.image3"})
    (('image', 'image3', 'image2'), (True, True, False))
    """
    present = [k for k in image_feature_keys if k in batch_keys]
    missing = [k for k in image_feature_keys if k not in batch_keys]
    names = tuple(camera_name(k) for k in (*present, *missing))
    return names, (True,) * len(present) + (False,) * len(missing)


def token_layout(policy, batch: Mapping[str, Any]) -> TokenLayout:
    """The :class:`TokenLayout` of one inference of ``policy`` (Pi0.5, Pi0, SmolVLA) on its preprocessed ``batch``."""
    from attnstore.capture.policies import adapter_for

    return adapter_for(policy).token_layout(batch)


def key_valid(layout: TokenLayout, language_mask: np.ndarray) -> np.ndarray:
    """(B, K) bool: keys an action token may attend to (missing cameras and language padding False).

    >>> lay = TokenLayout(("a", "b"), (True, False), grid_rows=1, grid_cols=2, num_language=3, num_action=2)
    >>> key_valid(lay, np.array([[True, True, False]])).astype(int).tolist()
    [[1, 1, 0, 0, 1, 1, 0, 1, 1]]
    """
    mask = np.asarray(language_mask, dtype=bool)
    if mask.ndim != 2 or mask.shape[1] != layout.num_language:
        raise CaptureError(f"language mask of shape {mask.shape} does not fit {layout.num_language} language tokens")
    valid = np.repeat(layout.static_key_valid()[None, :], mask.shape[0], axis=0)
    valid[:, layout.region_slice("language")] = mask
    return valid


def images_as_uint8(images: Sequence[Any], present: Sequence[bool]):
    """(B, C, H, W, 3) uint8 of the present cameras from ``_preprocess_images``' output.

    The policy feeds SigLIP channels-first floats in [-1, 1]; this maps them back to 0..255
    (torch, on the tensors' device) without changing the view: upright, as the policy saw them.
    """
    import torch

    chosen = [img for img, keep in zip(images, present) if keep]
    stacked = torch.stack(chosen, dim=1)  # (B, C, 3, H, W)
    if stacked.shape[2] != 3:  # channels-last input stays channels-last in the policy
        stacked = stacked.permute(0, 1, 4, 2, 3)
    pixels = ((stacked.float() + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)
    return pixels.permute(0, 1, 3, 4, 2).contiguous()


class TokenText:
    """Per-token text of language token ids, cached per id (``tokenizer.decode([id])``).

    >>> class Tok:
    ...     def decode(self, ids): return {5: " pick", 6: " up"}[ids[0]]
    >>> TokenText(Tok())(np.array([[5, 6, 5]]), np.array([[True, True, False]])).tolist()
    [[' pick', ' up', '']]
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, ids: np.ndarray, valid: np.ndarray) -> np.ndarray:
        out = np.full(ids.shape, "", dtype=object)
        for idx in zip(*np.nonzero(valid)):
            tid = int(ids[idx])
            text = self._cache.get(tid)
            if text is None:
                text = self._cache[tid] = str(self.tokenizer.decode([tid]))
            out[idx] = text
        return out.astype(str)
