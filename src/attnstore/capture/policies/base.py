"""PolicyAdapter: the one interface between :class:`~attnstore.capture.recorder.AttentionRecorder` and a
lerobot flow-matching VLA.

The recorder never touches a policy's internals itself; it asks the policy's adapter

* which modules are the action expert's layers (and which are self- or cross-attention), the VLM's
  layers, how many heads and denoise steps there are;
* to install a hook that hands it one layer's action-token attention probabilities per denoise step
  (``register_expert_hook``) or one VLM layer's prefix self-attention (``register_prefix_hook``), always in
  the store's key order and shape, whatever the policy computes (Pi0's extra state query is dropped,
  SmolVLA's cross-attention layers get zeros for the action keys they do not see, ...);
* which of the policy's methods to wrap for the bookkeeping: the one that runs the model once
  (``chunk_method``), the one that preprocesses images (``images_method``), the object whose
  ``denoise_step`` runs each step (``denoise_owner``) and where the step's time is in its arguments;
* the :class:`~attnstore.schema.TokenLayout` of a batch, the language tokens and mask laid out as in the
  store, and the keys an action token may attend to.

Hooks follow torch's forward-hook signature ``hook(module, args, kwargs, output)`` with ``output[1]`` the
probabilities (B, heads, queries, keys), so one recorder hook serves every policy. Each
``register_*`` returns a handle with ``remove()``; removing every handle leaves the policy as it was.
Adding a VLA is one module: a subclass registered in :mod:`attnstore.capture.policies`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from attnstore.errors import CaptureError
from attnstore.schema import TokenLayout

Hook = Callable[[Any, tuple, dict, tuple], Any]

SELF = "self"
CROSS = "cross"


class PolicyAdapter:
    """Where one lerobot policy type computes what the recorder captures. Subclass per policy type."""

    policy_type: ClassVar[str] = ""  # lerobot's config type name ("pi05", "pi0", "smolvla")
    label: ClassVar[str] = ""  # for messages ("Pi0.5")
    chunk_method: ClassVar[str] = "predict_action_chunk"  # the policy method that runs the model once
    images_method: ClassVar[str] = "_preprocess_images"  # returns (images in [-1, 1], masks)
    timestep_position: ClassVar[int] = 3  # positional index of ``timestep`` in ``denoise_step``

    def __init__(self, policy: Any) -> None:
        self.policy = policy

    # ---- the policy class and its config (no policy instance needed) -------------------------------
    @classmethod
    def policy_class(cls) -> type:
        """lerobot's policy class of this type."""
        raise NotImplementedError

    @classmethod
    def config_depths(cls, config: Any) -> tuple[int, int]:
        """(action-expert depth, VLM depth) the model of ``config`` will have (before it is built)."""
        raise NotImplementedError

    @classmethod
    def config_denoise_steps(cls, config: Any) -> int:
        """Denoise steps per model run, from the config."""
        return int(config.num_inference_steps)

    # ---- structure -----------------------------------------------------------------------------------
    def expert_layers(self) -> Sequence[Any]:
        raise NotImplementedError

    def vlm_layers(self) -> Sequence[Any]:
        raise NotImplementedError

    def layer_kinds(self) -> tuple[str, ...]:
        """"self" or "cross" per expert layer (what its action tokens attend to)."""
        return (SELF,) * len(self.expert_layers())

    def store_layer_kinds(self, layers: Sequence[int]) -> tuple[str, ...]:
        """``StoreSpec.layer_kinds`` of the captured ``layers``: () when all are self-attention."""
        kinds = self.layer_kinds()
        return () if all(k == SELF for k in kinds) else tuple(kinds[i] for i in layers)

    def num_heads(self) -> int:
        raise NotImplementedError

    def num_denoise_steps(self) -> int:
        return self.config_denoise_steps(self.policy.config)

    def denoise_owner(self) -> Any:
        """The object whose ``denoise_step`` the recorder wraps (one call per denoise step)."""
        return self.policy.model

    def denoise_timestep(self, args: tuple, kwargs: Mapping[str, Any]) -> Any:
        """The time tensor of one ``denoise_step`` call, from its arguments."""
        return kwargs["timestep"] if "timestep" in kwargs else args[self.timestep_position]

    def image_shape(self, batch: Mapping[str, Any]) -> tuple[int, int, int]:
        """(H, W, 3) of the images the policy feeds its vision encoder."""
        h, w = self.policy.config.image_resolution
        return int(h), int(w), 3

    # ---- capture points --------------------------------------------------------------------------------
    def register_expert_hook(self, index: int, hook: Hook) -> Any:
        """``hook`` gets expert layer ``index``'s action-token attention (B, H, num_action, num_keys) per step."""
        raise NotImplementedError

    def register_prefix_hook(self, index: int, hook: Hook) -> Any:
        """``hook`` gets VLM layer ``index``'s prefix self-attention (B, H, prefix_len, prefix_len)."""
        raise NotImplementedError

    # ---- layout --------------------------------------------------------------------------------------
    def token_layout(self, batch: Mapping[str, Any]) -> TokenLayout:
        raise NotImplementedError

    def language(self, batch: Mapping[str, Any]) -> tuple[Any, Any]:
        """(tokens, mask) tensors of the batch's prompt, as long as the layout's language region."""
        from lerobot.utils.constants import OBS_LANGUAGE_ATTENTION_MASK, OBS_LANGUAGE_TOKENS

        return batch[OBS_LANGUAGE_TOKENS], batch[OBS_LANGUAGE_ATTENTION_MASK]

    def key_valid(self, layout: TokenLayout, language_mask: np.ndarray) -> np.ndarray:
        """(B, K) bool: keys an action token may attend to (missing cameras, padding False)."""
        from attnstore.capture.layout import key_valid

        return key_valid(layout, language_mask)

    # ---- helpers -----------------------------------------------------------------------------------
    def camera_slots(self, batch: Mapping[str, Any]) -> tuple[tuple[str, ...], tuple[bool, ...]]:
        """Camera names in the order the policy embeds them, and which are present (all missing kept)."""
        from attnstore.capture.layout import camera_slots

        cameras, present = camera_slots(list(self.policy.config.image_features), batch.keys())
        if not any(present):
            raise CaptureError("no camera of the policy's config is in the batch; the policy would refuse it too")
        return cameras, present


class Handle:
    """A removable registration (``remove()`` runs ``undo`` once)."""

    def __init__(self, undo: Callable[[], None]) -> None:
        self._undo: Callable[[], None] | None = undo

    def remove(self) -> None:
        undo, self._undo = self._undo, None
        if undo is not None:
            undo()


def map_output(hook: Hook, transform: Callable[[Any], Any]) -> Hook:
    """A forward hook that hands ``hook`` ``output[1]`` transformed (the module's output is untouched)."""

    def mapped(module, args, kwargs, output):
        hook(module, args, kwargs, (output[0], transform(output[1])))
        return None

    return mapped
