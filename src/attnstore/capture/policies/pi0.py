"""Pi0 (lerobot ``pi0``): PaliGemma + a Gemma action expert like Pi0.5, with the robot state as a token.

Differences from Pi0.5 that the capture follows (lerobot 0.6.1, ``policies/pi0/modeling_pi0.py``):

* ``PI0Pytorch.embed_suffix`` puts one state token (``state_proj(state)``) before the 50 action tokens
  and mixes the flow-matching time into the action tokens (``action_time_mlp_*``), so each denoise step's
  expert attention (``gemma_expert.model.layers[i].self_attn``, transformers' ``GemmaAttention``
  returning ``(output, attn_weights)``, eager as ``denoise_step`` forces) is (B, 8, 51, prefix + 51);
  the hook keeps the 50 action-token queries (the last ``chunk_size`` rows). The state key stays: key
  order ``[256 patches per camera slot | language | state | 50 action tokens]``, region ``state``.
  Its mask (``att_masks`` [1, 1, 0, ...]) lets every action token see the prefix, the state and all
  action tokens;
* the VLM prefix pass covers cameras and language only (the state is in the suffix): its (B, 8, P, P)
  self-attention is stored with a zero row and column for the state token, so ``prefix_attention``
  keeps the store's ``prefix_len`` (rollouts carry the state token through unchanged);
* ``denoise_step(state, prefix_pad_masks, past_key_values, x_t, timestep)``.
"""

from __future__ import annotations

from typing import Any

from attnstore.capture.policies.base import Hook, map_output
from attnstore.capture.policies.pi05 import PaliGemmaAdapter

STATE_TOKENS = 1  # PI0Pytorch.embed_suffix: state_emb[:, None, :]


class Pi0Adapter(PaliGemmaAdapter):
    policy_type = "pi0"
    label = "Pi0"
    timestep_position = 4
    num_state = STATE_TOKENS

    @classmethod
    def policy_class(cls) -> type:
        from lerobot.policies.pi0.modeling_pi0 import PI0Policy

        return PI0Policy

    @classmethod
    def config_depths(cls, config: Any) -> tuple[int, int]:
        from lerobot.policies.pi0 import modeling_pi0

        return cls._gemma_depths(config, modeling_pi0)

    def register_expert_hook(self, index: int, hook: Hook) -> Any:
        n = int(self.policy.config.chunk_size)
        # suffix queries are [state, action_0 .. action_49]: keep the action tokens' rows
        return super().register_expert_hook(index, map_output(hook, lambda p: p[:, :, -n:, :]))

    def register_prefix_hook(self, index: int, hook: Hook) -> Any:
        import torch.nn.functional as F

        s = self.num_state

        def with_state(p):  # the VLM never sees the state token: its row and column are 0
            return F.pad(p, (0, s, 0, s))

        return super().register_prefix_hook(index, map_output(hook, with_state))
