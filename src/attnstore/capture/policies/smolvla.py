"""SmolVLA (lerobot ``smolvla``): SmolVLM2 + a smaller action expert whose layers alternate self-attention
(over the VLM's cached prefix keys plus the action tokens) and cross-attention (to the VLM's keys only).

Capture points (lerobot 0.6.1, ``policies/smolvla/smolvlm_with_expert.py``). SmolVLA does not run its
attention through modules that return probabilities: ``SmolVLMWithExpertModel.eager_attention_forward``
computes ``probs = softmax(...)`` and returns only ``probs @ V``. So, per model instance, never by editing
a file or a class:

* an instance-level wrapper of ``vlm_with_expert.eager_attention_forward`` (``get_attention_interface``
  looks it up on the instance at every call) that, only while a hooked layer runs, records the one
  softmax output of the call with a thread-local :class:`torch.overrides.TorchFunctionMode`: the very
  tensor lerobot multiplies with V (its output is returned unchanged, so actions stay bit-identical);
* instance-level wrappers of ``forward_attn_layer`` / ``forward_cross_attn_layer`` (which layer, which
  kind, prefix pass or denoise step: ``inputs_embeds`` is ``[prefix, None]`` in the prefix pass and
  ``[None, suffix]`` in each denoise step);
* an instance-level wrapper of ``policy.model.embed_prefix`` for the model's own prefix shape per run
  (camera slots embedded, language length, padding), to put each key where the store's layout has it.

Key order (``VLAFlowMatching.embed_prefix`` / ``embed_suffix``)::

    per camera slot: [image-start tokens (add_image_special_tokens: <fake_token_around_image><global-img>)
                      | (S/patch/scale)^2 tokens after the connector's pixel shuffle, row-major
                      | image-end token <fake_token_around_image>]
    [language tokens | 1 state token | padding to prefix_length | chunk_size action tokens]

Camera slots: present cameras (config order), then missing ones up to ``empty_cameras``
(``SmolVLAPolicy.prepare_images``). The prompt is padded to the ``longest`` prompt of the batch by default
(``pad_language_to``): the store's language region is ``tokenizer_max_length`` long and shorter prompts
are laid into it with masked padding, so one store holds every task. Action tokens attend causally to each
other (``att_masks`` 1 per action token): a query's later action keys are 0. Cross-attention layers see the
prefix keys only: their action keys are 0 and ``layer_kind`` says ``cross``.

The softmax recorder is :mod:`attnstore.capture.policies.softmax_tap`, the placing of a run's keys in
the store's key axis :mod:`attnstore.capture.policies.smolvla_keys`.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from attnstore.capture.policies.base import CROSS, SELF, Handle, Hook, PolicyAdapter
from attnstore.capture.policies.smolvla_keys import STATE_TOKENS, KeyMap, key_map, place_probs
from attnstore.capture.policies.softmax_tap import SoftmaxTap
from attnstore.errors import CaptureError
from attnstore.schema import TokenLayout


@dataclass
class _Layer:
    """The layer function running now (set by the layer wrappers, read by the attention wrapper)."""

    kind: str
    module: Any
    hooks: list[Hook] = field(default_factory=list)
    prefix: bool = False  # the prefix pass (VLM layer), else a denoise step (expert layer)


class SmolVLAAdapter(PolicyAdapter):
    policy_type = "smolvla"
    label = "SmolVLA"
    chunk_method = "_get_action_chunk"  # select_action and predict_action_chunk both run the model here
    images_method = "prepare_images"
    timestep_position = 3  # denoise_step(prefix_pad_masks, past_key_values, x_t, timestep)

    def __init__(self, policy: Any) -> None:
        super().__init__(policy)
        self._expert_hooks: dict[int, list[Hook]] = {}
        self._prefix_hooks: dict[int, list[Hook]] = {}
        self._saved: list[tuple[Any, str, Any]] = []
        self._keys: KeyMap | None = None
        self._layer = threading.local()
        config = policy.config
        if not getattr(config, "use_cache", True):
            raise CaptureError(
                "SmolVLA with use_cache=false cannot run its denoise steps (lerobot's cross-attention layers "
                "read the VLM's keys from the cache): set --policy.use_cache=true"
            )

    # ---- config ----------------------------------------------------------------------------------------
    @classmethod
    def policy_class(cls) -> type:
        from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

        return SmolVLAPolicy

    @classmethod
    def config_denoise_steps(cls, config: Any) -> int:
        return int(config.num_steps)

    @classmethod
    def config_depths(cls, config: Any) -> tuple[int, int]:
        """(expert depth, VLM depth): ``num_vlm_layers`` of the VLM (its config read when it is -1 or more
        than the VLM has, from the local hub cache), the expert as deep or ``num_expert_layers``."""
        vlm = int(config.num_vlm_layers)
        try:
            from transformers import AutoConfig

            full = int(AutoConfig.from_pretrained(config.vlm_model_name).text_config.num_hidden_layers)
            vlm = full if vlm <= 0 else min(vlm, full)
        except Exception:  # noqa: BLE001 - offline without the VLM's config: trust num_vlm_layers
            if vlm <= 0:
                raise CaptureError(
                    f"cannot read {config.vlm_model_name}'s config to count its layers; "
                    f"set --policy.num_vlm_layers or make the VLM's config available"
                ) from None
        expert = int(config.num_expert_layers)
        return (expert if expert > 0 else vlm), vlm

    # ---- structure ---------------------------------------------------------------------------------------
    @property
    def _joint(self) -> Any:
        return self.policy.model.vlm_with_expert

    def expert_layers(self) -> Sequence[Any]:
        return self._joint.lm_expert.layers

    def vlm_layers(self) -> Sequence[Any]:
        return self._joint.get_vlm_model().text_model.layers

    def num_heads(self) -> int:
        return int(self._joint.num_attention_heads)

    def _vlm_to_expert(self) -> dict[int, int]:
        """VLM layer index -> index of the expert layer that runs beside it (lerobot's own pairing)."""
        joint = self._joint
        vlm, expert = joint.get_model_layers([joint.get_vlm_model().text_model, joint.lm_expert])[:2]
        index = {id(m): j for j, m in enumerate(joint.lm_expert.layers)}
        return {i: index[id(m)] for i, m in enumerate(expert) if m is not None and i < len(vlm)}

    def layer_kinds(self) -> tuple[str, ...]:
        """Per expert layer: ``self`` where ``SmolVLMWithExpertModel.forward`` runs ``forward_attn_layer``
        during denoising (no "cross" in ``attention_mode``, or every ``self_attn_every_n_layers``-th VLM
        layer), else ``cross``."""
        joint = self._joint
        n = joint.self_attn_every_n_layers
        kinds = [SELF] * len(self.expert_layers())
        for i, j in self._vlm_to_expert().items():
            cross = "cross" in joint.attention_mode and not (n > 0 and i % n == 0)
            kinds[j] = CROSS if cross else SELF
        return tuple(kinds)

    def image_shape(self, batch: Mapping[str, Any]) -> tuple[int, int, int]:
        h, w = self._image_hw(batch)
        return h, w, 3

    def _image_hw(self, batch: Mapping[str, Any]) -> tuple[int, int]:
        size = self.policy.config.resize_imgs_with_padding
        if size is not None:  # SmolVLA stores (width, height)
            return int(size[1]), int(size[0])
        for key in self.policy.config.image_features:
            if key in batch:
                return int(batch[key].shape[-2]), int(batch[key].shape[-1])
        raise CaptureError("no camera of the policy's config is in the batch; the policy would refuse it too")

    # ---- layout ----------------------------------------------------------------------------------------
    def camera_slots(self, batch: Mapping[str, Any]) -> tuple[tuple[str, ...], tuple[bool, ...]]:
        cameras, present = super().camera_slots(batch)
        keep = sum(present) + min(len(present) - sum(present), int(self.policy.config.empty_cameras))
        return cameras[:keep], present[:keep]  # prepare_images embeds empty_cameras missing ones at most

    def token_layout(self, batch: Mapping[str, Any]) -> TokenLayout:
        config, model = self.policy.config, self.policy.model
        cameras, present = self.camera_slots(batch)
        h, w = self._image_hw(batch)
        side = self._grid_side(h, w)
        start, end = self._special_tokens()
        num_language = int(config.tokenizer_max_length)
        self._check_language(batch, num_language)
        seq = len(cameras) * (start + side * side + end) + num_language + STATE_TOKENS
        return TokenLayout(
            cameras=cameras,
            camera_present=present,
            grid_rows=side,
            grid_cols=side,
            num_language=num_language,
            num_action=int(config.chunk_size),
            num_state=STATE_TOKENS,
            camera_start_tokens=start,
            camera_end_tokens=end,
            num_padding=max(0, int(model.prefix_length) - seq),
        )

    def language(self, batch: Mapping[str, Any]) -> tuple[Any, Any]:
        """The prompt laid into ``tokenizer_max_length`` keys: shorter ones get masked padding after them."""
        import torch.nn.functional as F

        tokens, mask = super().language(batch)
        n = int(self.policy.config.tokenizer_max_length)
        self._check_language(batch, n)
        pad = n - int(tokens.shape[1])
        if pad == 0:
            return tokens, mask
        return F.pad(tokens, (0, pad)), F.pad(mask.bool(), (0, pad))

    def _grid_side(self, h: int, w: int) -> int:
        """Tokens per side of one camera after SigLIP's patches and the connector's pixel shuffle."""
        vlm = self._joint.config
        patch, scale = int(vlm.vision_config.patch_size), int(vlm.scale_factor)
        if h != w or h % (patch * scale):
            raise CaptureError(
                f"SmolVLA images of {h}x{w} px do not give a square grid of patch {patch} x scale {scale}"
            )
        return h // patch // scale

    def _special_tokens(self) -> tuple[int, int]:
        """(start, end) special tokens around each camera (``add_image_special_tokens``)."""
        model = self.policy.model
        if not model.add_image_special_tokens:
            return 0, 0
        return int(model.global_image_start_token.numel()), int(model.image_end_token.numel())

    @staticmethod
    def _check_language(batch: Mapping[str, Any], n: int) -> None:
        from lerobot.utils.constants import OBS_LANGUAGE_TOKENS

        got = int(batch[OBS_LANGUAGE_TOKENS].shape[1])
        if got > n:
            raise CaptureError(f"the prompt has {got} tokens, more than SmolVLA's tokenizer_max_length {n}")

    # ---- capture points --------------------------------------------------------------------------------
    def register_expert_hook(self, index: int, hook: Hook) -> Any:
        return self._register(self._expert_hooks, index, hook, len(self.expert_layers()))

    def register_prefix_hook(self, index: int, hook: Hook) -> Any:
        return self._register(self._prefix_hooks, index, hook, len(self.vlm_layers()))

    def _register(self, table: dict[int, list[Hook]], index: int, hook: Hook, depth: int) -> Handle:
        if not 0 <= index < depth:
            raise CaptureError(f"layer {index} is out of range for this SmolVLA ({depth} layers)")
        if not self._saved:
            self._install()
        table.setdefault(index, []).append(hook)

        def undo() -> None:
            table[index].remove(hook)
            if not table[index]:
                del table[index]
            if not self._expert_hooks and not self._prefix_hooks:
                self._uninstall()

        return Handle(undo)

    def _install(self) -> None:
        import torch

        joint, model = self._joint, self.policy.model
        self._kinds = self.layer_kinds()
        self._pairs = self._vlm_to_expert()
        for owner, name, make in (
            (model, "embed_prefix", self._wrap_embed_prefix),
            (joint, "forward_attn_layer", lambda f: self._wrap_layer(f, SELF)),
            (joint, "forward_cross_attn_layer", lambda f: self._wrap_layer(f, CROSS)),
            (joint, "eager_attention_forward", self._wrap_attention),
        ):
            self._saved.append((owner, name, owner.__dict__.get(name, _MISSING)))
            owner.__dict__[name] = torch.compiler.disable(make(getattr(owner, name)))

    def _uninstall(self) -> None:
        for owner, name, previous in reversed(self._saved):
            if previous is _MISSING:
                owner.__dict__.pop(name, None)
            else:
                owner.__dict__[name] = previous
        self._saved.clear()
        self._keys = None

    # ---- the wrappers --------------------------------------------------------------------------------
    def _wrap_embed_prefix(self, original):
        def embed_prefix(images, img_masks, lang_tokens, lang_masks, *args, **kwargs):
            out = original(images, img_masks, lang_tokens, lang_masks, *args, **kwargs)
            self._keys = self._key_map(images, int(lang_tokens.shape[1]), out[1])
            return out

        return embed_prefix

    def _wrap_layer(self, original, kind: str):
        def layer(model_layers, inputs_embeds, layer_idx, *args, **kwargs):
            prefix_pass = inputs_embeds[0] is not None and (len(inputs_embeds) < 2 or inputs_embeds[1] is None)
            denoise = inputs_embeds[0] is None and len(inputs_embeds) > 1 and inputs_embeds[1] is not None
            current = None
            if prefix_pass and layer_idx in self._prefix_hooks:
                module = self.vlm_layers()[layer_idx].self_attn
                current = _Layer(SELF, module, list(self._prefix_hooks[layer_idx]), prefix=True)
            elif denoise and self._pairs.get(layer_idx) in self._expert_hooks:
                j = self._pairs[layer_idx]
                if kind != self._kinds[j]:
                    raise CaptureError(
                        f"SmolVLA expert layer {j} ran {kind}-attention, its config says {self._kinds[j]}: "
                        f"is this lerobot 0.6.1's SmolVLA?"
                    )
                current = _Layer(kind, self.expert_layers()[j].self_attn, list(self._expert_hooks[j]))
            self._layer.current = current
            try:
                return original(model_layers, inputs_embeds, layer_idx, *args, **kwargs)
            finally:
                self._layer.current = None

        return layer

    def _wrap_attention(self, original):
        def eager_attention_forward(*args, **kwargs):
            current = getattr(self._layer, "current", None)
            if current is None:
                return original(*args, **kwargs)
            self._layer.current = None  # one attention call per layer function in inference
            with SoftmaxTap() as tap:
                out = original(*args, **kwargs)
            if len(tap.outputs) != 1:
                raise CaptureError(
                    f"SmolVLA's attention computed {len(tap.outputs)} softmaxes, one expected: "
                    f"is this lerobot 0.6.1's SmolVLA?"
                )
            probs = self._to_store(tap.outputs[0], current)
            for hook in current.hooks:
                hook(current.module, (), {}, (out, probs))
            return out

        return eager_attention_forward

    # ---- model keys -> store keys (capture/policies/smolvla_keys.py) -----------------------------------
    def _key_map(self, images: Sequence[Any], n_language: int, pad_masks) -> KeyMap:
        """The store positions of the model's prefix keys, from this run's embed_prefix inputs and masks."""
        start, end = self._special_tokens()
        side = self._grid_side(int(images[0].shape[-1]), int(images[0].shape[-2]))
        return key_map(len(images) * (start + side * side + end), n_language, pad_masks,
                       width=int(self.policy.config.tokenizer_max_length),
                       prefix_length=int(self.policy.model.prefix_length))

    def _to_store(self, probs, current: _Layer):
        """(B, H, Q, K_model) -> the store's keys (:func:`~attnstore.capture.policies.smolvla_keys.place_probs`)."""
        if self._keys is None:
            raise CaptureError("SmolVLA ran its attention before embed_prefix: cannot place its keys")
        return place_probs(probs, self._keys, kind=current.kind, prefix=current.prefix,
                           action=int(self.policy.config.chunk_size))


_MISSING = object()
