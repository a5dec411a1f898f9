"""Pi0.5 (lerobot ``pi05``): PaliGemma + a Gemma action expert, joint attention through a KV cache.

Capture points (lerobot 0.6.1, eager attention forced by the policy itself):

* ``policy.model.paligemma_with_expert.gemma_expert.model.layers[i].self_attn``: each denoise step runs
  the expert alone on the 50 action tokens against the cached prefix (``PI05Pytorch.denoise_step`` ->
  ``PaliGemmaWithExpertModel.forward`` with ``inputs_embeds=[None, suffix]``); transformers'
  ``GemmaAttention.forward`` returns ``(output, attn_weights)`` with the softmax (B, 8, 50, prefix + 50);
  a forward hook reads ``output[1]``;
* ``...paligemma.model.language_model.layers[i].self_attn`` during the prefix pass: (B, 8, P, P).

Key order: ``[256 patches per camera slot | language (tokenizer_max_length) | 50 action tokens]``
(``PI05Pytorch.embed_prefix`` / ``embed_suffix``); camera slots as ``_preprocess_images`` orders them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from attnstore.capture.policies.base import Hook, PolicyAdapter
from attnstore.schema import TokenLayout


class PaliGemmaAdapter(PolicyAdapter):
    """What Pi0.5 and Pi0 share: ``policy.model.paligemma_with_expert`` (PaliGemma + Gemma expert)."""

    num_state = 0  # state tokens between language and action in the key axis

    @property
    def _joint(self) -> Any:
        return self.policy.model.paligemma_with_expert

    def expert_layers(self) -> Sequence[Any]:
        return self._joint.gemma_expert.model.layers

    def vlm_layers(self) -> Sequence[Any]:
        return self._joint.paligemma.model.language_model.layers

    def num_heads(self) -> int:
        return int(self._joint.gemma_expert.config.num_attention_heads)

    def patch_grid(self) -> tuple[int, int]:
        """(rows, cols) of SigLIP's patch grid (224 px / patch 14 -> 16 x 16)."""
        vision = self._joint.paligemma.config.vision_config
        side = int(vision.image_size) // int(vision.patch_size)
        return side, side

    def token_layout(self, batch: Mapping[str, Any]) -> TokenLayout:
        from lerobot.utils.constants import OBS_LANGUAGE_TOKENS

        cameras, present = self.camera_slots(batch)
        rows, cols = self.patch_grid()
        return TokenLayout(
            cameras=cameras,
            camera_present=present,
            grid_rows=rows,
            grid_cols=cols,
            num_language=int(batch[OBS_LANGUAGE_TOKENS].shape[1]),
            num_action=int(self.policy.config.chunk_size),
            num_state=self.num_state,
        )

    def register_expert_hook(self, index: int, hook: Hook) -> Any:
        return self.expert_layers()[index].self_attn.register_forward_hook(hook, with_kwargs=True)

    def register_prefix_hook(self, index: int, hook: Hook) -> Any:
        return self.vlm_layers()[index].self_attn.register_forward_hook(hook, with_kwargs=True)

    @classmethod
    def _gemma_depths(cls, config: Any, modeling: Any) -> tuple[int, int]:
        expert = modeling.get_gemma_config(config.action_expert_variant).depth
        return int(expert), int(modeling.get_gemma_config(config.paligemma_variant).depth)


class Pi05Adapter(PaliGemmaAdapter):
    policy_type = "pi05"
    label = "Pi0.5"
    timestep_position = 3  # denoise_step(prefix_pad_masks, past_key_values, x_t, timestep)

    @classmethod
    def policy_class(cls) -> type:
        from lerobot.policies.pi05.modeling_pi05 import PI05Policy

        return PI05Policy

    @classmethod
    def config_depths(cls, config: Any) -> tuple[int, int]:
        from lerobot.policies.pi05 import modeling_pi05

        return cls._gemma_depths(config, modeling_pi05)
