"""SmolVLA's keys -> the store's key axis: where one run's prefix keys go, and its probabilities placed there.

SmolVLA pads the prompt to the batch's longest one and its prefix to ``prefix_length``; the store's
language region is ``tokenizer_max_length`` long (one store holds every task). :func:`key_map` says,
per run, which model keys are kept and where they go; :func:`place_probs` lays a layer's
``(B, H, Q, K_model)`` probabilities into the store's keys (see :mod:`attnstore.capture.policies.smolvla`
for the key order).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from attnstore.capture.policies.base import SELF
from attnstore.errors import CaptureError

STATE_TOKENS = 1  # VLAFlowMatching.embed_prefix: state_emb[:, None, :]


@dataclass
class KeyMap:
    """Where the model's prefix keys of the run in progress go in the store's key axis."""

    model_len: int  # the model's prefix length (pad_masks.shape[1])
    store_len: int  # the layout's prefix_len
    keep: Any = None  # model positions kept (None: identity)
    to: Any = None  # their store positions


def key_map(cams: int, n_language: int, pad_masks: Any, *, width: int, prefix_length: int) -> KeyMap:
    """The store positions of the model's prefix keys, from this run's embed_prefix inputs and masks.

    ``cams``: the keys of every camera slot (special tokens included), ``n_language``: the run's prompt
    length, ``width``: the store's language region (``tokenizer_max_length``), ``prefix_length``: the
    model's padded prefix. A run that already has the store's shape maps as the identity:

    >>> import numpy as np
    >>> key_map(10, 5, np.zeros((1, 16), bool), width=5, prefix_length=16)
    KeyMap(model_len=16, store_len=16, keep=None, to=None)
    """
    model_len = int(pad_masks.shape[1])
    seq = cams + n_language + STATE_TOKENS  # the model's unpadded prefix
    store_seq = cams + width + STATE_TOKENS
    store_len = max(store_seq, int(prefix_length))
    if model_len != max(seq, int(prefix_length)):
        raise CaptureError(
            f"SmolVLA's prefix has {model_len} keys, its layout {seq} (+ padding): "
            f"is this lerobot 0.6.1's SmolVLA?"
        )
    if model_len == store_len and n_language == width:
        return KeyMap(model_len, store_len)
    import torch

    device = pad_masks.device
    pads = min(model_len - seq, store_len - store_seq)  # the model's extra padding keys are masked: dropped
    keep = torch.cat([torch.arange(cams + n_language + STATE_TOKENS), seq + torch.arange(pads)])
    to = torch.cat([
        torch.arange(cams + n_language),
        torch.tensor([cams + width]),  # the state token after the whole language region
        store_seq + torch.arange(pads),
    ])
    return KeyMap(model_len, store_len, keep.to(device), to.to(device))


def place_probs(probs: Any, keys: KeyMap, *, kind: str, prefix: bool, action: int) -> Any:
    """(B, H, Q, K_model) -> the store's keys: prefix keys placed by the run's key map, action keys
    after them (self-attention), zeros for keys the layer does not see (cross-attention's actions)."""
    if prefix:
        if keys.keep is None:
            return probs
        out = probs.new_zeros((*probs.shape[:2], keys.store_len, keys.store_len))
        picked = probs.index_select(-2, keys.keep).index_select(-1, keys.keep)
        out[:, :, keys.to[:, None], keys.to[None, :]] = picked
        return out
    seen = keys.model_len + (action if kind == SELF else 0)
    if probs.shape[-1] != seen:
        raise CaptureError(
            f"SmolVLA {kind}-attention has {probs.shape[-1]} keys, {seen} expected: "
            f"is this lerobot 0.6.1's SmolVLA?"
        )
    if keys.keep is None and kind == SELF:
        return probs
    out = probs.new_zeros((*probs.shape[:-1], keys.store_len + action))
    if keys.keep is None:
        out[..., : keys.model_len] = probs[..., : keys.model_len]
    else:
        out[..., keys.to] = probs[..., keys.keep]
    if kind == SELF:
        out[..., keys.store_len :] = probs[..., keys.model_len :]
    return out
