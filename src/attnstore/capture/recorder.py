"""AttentionRecorder: stream an unmodified lerobot Pi0.5's action-token attention into a writer.

Capture points (lerobot 0.6.1, eager attention forced by Pi0.5 itself):

* forward hooks on the action expert's ``layers[i].self_attn``: ``output[1]`` is the softmax
  (B, heads, 50 action queries, prefix + 50 keys), one call per layer per denoise step;
* optionally the VLM's ``language_model.layers[i].self_attn`` during the prefix pass (B, heads, P, P);
* instance-level wrappers (never class or file edits) of ``policy.reset`` / ``select_action`` /
  ``predict_action_chunk`` / ``_preprocess_images`` and ``policy.model.denoise_step`` for the
  bookkeeping: which episode and env step, which denoise step and its exact t, the images the
  policy saw, the predicted chunk.

One :class:`~attnstore.store.writer.InferenceBatch` per model run goes to the writer, whose thread
does the encoding and disk I/O. On CUDA the hooks copy into pinned host buffers with non-blocking
copies and the batch carries an event the writer waits on; on CPU they are plain copies. Hooks are
wrapped in ``torch.compiler.disable`` so ``compile_model=True`` graphs break around them instead of
recompiling every step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from attnstore import schema as S
from attnstore.capture import layout as L
from attnstore.capture.buffers import BufferRing, HostBuffers, ready_after, to_host
from attnstore.capture.episodes import EpisodeBook
from attnstore.capture.pi05 import check_policy, expert_layers, num_heads, vlm_layers
from attnstore.selection import Selection, parse_denoise_steps, parse_layers
from attnstore.errors import CaptureError
from attnstore.schema import StoreSpec
from attnstore.store.writer import AttentionWriter, InferenceBatch

_MISSING = object()


@dataclass
class _Inference:
    """State of the model run in progress."""

    episodes: np.ndarray  # (B,) episode index of each row
    env_step: int
    keep: np.ndarray | None
    buffers: HostBuffers
    language: tuple[np.ndarray, np.ndarray]  # (ids with -1 at padding, mask)
    state: Any = None  # (B, state_dim) tensor the policy saw, when stored
    denoise_index: int = -1  # index of the denoise step running now
    slot: int = -1  # its position among the selected steps, -1 = not selected
    times: list[Any] = field(default_factory=list)
    images: Any = None
    copied: bool = False


class AttentionRecorder:
    """Record a Pi0.5 policy's attention into an :class:`AttentionWriter` while it runs.

    Example::

        with AttentionWriter(out / "attention.zarr") as writer, \\
                AttentionRecorder(policy, writer, layers="last:2", tokenizer=find_tokenizer(pre)) as rec:
            policy.reset()                                  # a batch of B episodes starts
            action = policy.select_action(pre(observation))  # env step 0: the model runs, one row per env
            rec.set_active(~done)                            # finished envs stop being recorded

    Episodes and env steps follow lerobot-eval's calls (:class:`~attnstore.capture.episodes.EpisodeBook`):
    each ``policy.reset()`` after a batch starts the next B episodes, ``set_episodes`` overrides; the env
    step counts ``select_action`` calls since the reset. Only calls that run the model (not those served
    from the action queue) are recorded. ``state=True`` also stores ``observation.state`` as the policy
    saw it (after lerobot's processors), when the batch has one.
    """

    def __init__(
        self,
        policy,
        writer: AttentionWriter,
        *,
        layers: Selection = "last:2",
        denoise_steps: Selection = "all",
        prefix: bool | Selection = False,
        images: bool = True,
        actions: bool = True,
        state: bool = True,
        tokenizer=None,
        first_episode: int = 0,
        encoding: S.Encoding = "uint16",
    ) -> None:
        check_policy(policy)
        self.episodes = EpisodeBook(first_episode)
        if encoding not in S.ENCODINGS:
            raise CaptureError(f"encoding must be one of {S.ENCODINGS}, got {encoding!r}")
        self.policy = policy
        self.writer = writer
        self.layers = parse_layers(layers, len(expert_layers(policy)))
        self.denoise_steps = parse_denoise_steps(denoise_steps, int(policy.config.num_inference_steps))
        if prefix is False or prefix is None:
            self.prefix_layers: tuple[int, ...] = ()
        else:
            n_vlm = len(vlm_layers(policy))
            self.prefix_layers = (
                parse_layers(layers, n_vlm, what="VLM layer")
                if prefix is True
                else parse_layers(prefix, n_vlm, what="VLM layer")
            )
        self.store_images = bool(images)
        self.store_actions = bool(actions)
        self.store_state = bool(state)
        self.tokenizer = tokenizer
        self.encoding = encoding
        self.spec: StoreSpec | None = None
        self.inferences = 0  # model runs handed to the writer
        self._token_text = L.TokenText(tokenizer) if tokenizer is not None else None
        self._handles: list[Any] = []
        self._saved: list[tuple[Any, str, Any]] = []
        self._attached = False
        self._current: _Inference | None = None
        self._ring = BufferRing()

    # ---- public API --------------------------------------------------------------------------------
    def __enter__(self) -> AttentionRecorder:
        self.attach()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.detach()

    def attach(self) -> None:
        """Install the hooks and wrappers. The policy is left exactly as found by :meth:`detach`."""
        if self._attached:
            return
        import torch

        try:
            policy, model = self.policy, self.policy.model
            self._wrap(policy, "reset", self._on_reset)
            self._wrap(policy, "select_action", self._on_select_action)
            self._wrap(policy, "predict_action_chunk", self._on_predict_action_chunk)
            self._wrap(policy, "_preprocess_images", self._on_preprocess_images)
            self._wrap(model, "denoise_step", self._on_denoise_step)
            expert = expert_layers(policy)
            for slot, i in enumerate(self.layers):
                hook = torch.compiler.disable(self._make_expert_hook(slot))
                self._handles.append(expert[i].self_attn.register_forward_hook(hook, with_kwargs=True))
            vlm = vlm_layers(policy)
            for slot, i in enumerate(self.prefix_layers):
                hook = torch.compiler.disable(self._make_prefix_hook(slot))
                self._handles.append(vlm[i].self_attn.register_forward_hook(hook, with_kwargs=True))
            self._attached = True
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        """Remove every hook and wrapper this recorder added (safe to call twice)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for owner, name, previous in reversed(self._saved):
            if previous is _MISSING:
                owner.__dict__.pop(name, None)
            else:
                owner.__dict__[name] = previous
        self._saved.clear()
        self._current = None
        self._attached = False

    def set_active(self, active) -> None:
        """(B,) bool: rows recorded from now on (finished envs False). ``policy.reset()`` re-activates all."""
        self.episodes.set_active(_to_numpy(active))

    def set_episodes(self, episodes) -> None:
        """Explicit episode indices of the current batch's rows (until the next ``policy.reset()``)."""
        self.episodes.set_episodes(_to_numpy(episodes))

    @property
    def env_step(self) -> int:
        """``select_action`` calls since the last reset (the env step of the next call)."""
        return self.episodes.env_step

    # ---- wrappers ----------------------------------------------------------------------------------
    def _wrap(self, owner, name: str, make: Callable[[Callable], Callable]) -> None:
        previous = owner.__dict__.get(name, _MISSING)
        original = getattr(owner, name)
        self._saved.append((owner, name, previous))
        owner.__dict__[name] = make(original)

    def _on_reset(self, original):
        def reset(*args, **kwargs):
            result = original(*args, **kwargs)
            self.episodes.reset()
            return result

        return reset

    def _on_select_action(self, original):
        def select_action(batch, *args, **kwargs):
            try:
                return original(batch, *args, **kwargs)
            finally:
                self.episodes.after_select()

        return select_action

    def _on_predict_action_chunk(self, original):
        def predict_action_chunk(batch, *args, **kwargs):
            run = self._begin(batch)
            try:
                actions = original(batch, *args, **kwargs)
                if run is not None:
                    self._finish(run, actions)
                return actions
            finally:
                self._current = None

        return predict_action_chunk

    def _on_preprocess_images(self, original):
        def preprocess_images(batch, *args, **kwargs):
            images, img_masks = original(batch, *args, **kwargs)
            if self._current is not None:
                self._current.images = images
            return images, img_masks

        return preprocess_images

    def _on_denoise_step(self, original):
        import torch

        @torch.compiler.disable
        def note_step(timestep):
            run = self._current
            if run is None:
                return
            run.denoise_index += 1
            d = run.denoise_index
            run.slot = self.denoise_steps.index(d) if d in self.denoise_steps else -1
            if run.slot >= 0:
                run.times.append(timestep.detach().reshape(-1)[:1])

        def denoise_step(*args, **kwargs):
            timestep = kwargs["timestep"] if "timestep" in kwargs else args[3]
            note_step(timestep)
            return original(*args, **kwargs)

        return denoise_step

    # ---- hooks -------------------------------------------------------------------------------------
    def _make_expert_hook(self, layer_slot: int):
        def hook(module, args, kwargs, output):
            run = self._current
            if run is None or run.slot < 0:
                return None
            probs = output[1]
            expected = run.buffers.attention.shape[-2:]
            if tuple(probs.shape[-2:]) != tuple(expected):
                raise CaptureError(
                    f"expert attention has shape {tuple(probs.shape)}, the token layout expects "
                    f"(B, H, {expected[0]}, {expected[1]}); is this a Pi0.5 with an unexpected input?"
                )
            run.buffers.attention[:, run.slot, layer_slot].copy_(probs, non_blocking=probs.is_cuda)
            run.copied = True
            return None

        return hook

    def _make_prefix_hook(self, layer_slot: int):
        def hook(module, args, kwargs, output):
            run = self._current
            if run is None or run.buffers.prefix is None:
                return None
            if run.denoise_index >= 0:  # only the prefix pass, never a denoise step
                return None
            probs = output[1]
            run.buffers.prefix[:, layer_slot].copy_(probs, non_blocking=probs.is_cuda)
            return None

        return hook

    # ---- one inference -------------------------------------------------------------------------------
    def _begin(self, batch) -> _Inference | None:
        from lerobot.utils.constants import OBS_LANGUAGE_ATTENTION_MASK, OBS_LANGUAGE_TOKENS, OBS_STATE

        tokens = batch[OBS_LANGUAGE_TOKENS]
        b = int(tokens.shape[0])
        episodes = self.episodes.start_batch(b)
        keep = self.episodes.keep()
        if keep is not None and not keep.any():
            return None  # every env finished: the model runs, nothing is recorded
        if self.spec is None:
            self._start_store(batch)
        else:
            self._check_layout(batch)
        # ids and mask are inputs: fetching them before the model runs costs no wait for it
        mask = batch[OBS_LANGUAGE_ATTENTION_MASK].detach().cpu().numpy().astype(bool)
        ids = tokens.detach().cpu().numpy().astype(np.int32)
        run = _Inference(
            episodes=episodes,
            env_step=self.episodes.env_step,
            keep=keep,
            buffers=self._next_buffers(b, tokens.device),
            language=(np.where(mask, ids, S.LANGUAGE_PAD_ID).astype(np.int32), mask),
            state=batch[OBS_STATE] if S.STATE in self.spec.extra_shapes else None,
        )
        self._current = run
        return run

    def _start_store(self, batch) -> None:
        from lerobot.utils.constants import OBS_STATE

        layout = L.token_layout(self.policy, batch)
        action_dim = int(self.policy.config.output_features["action"].shape[0])
        extra = {}
        if self.store_state and OBS_STATE in batch:
            extra[S.STATE] = tuple(int(v) for v in batch[OBS_STATE].shape[1:])
        spec = StoreSpec(
            layout=layout,
            layers=self.layers,
            denoise_steps=self.denoise_steps,
            num_denoise_steps=int(self.policy.config.num_inference_steps),
            num_layers=len(expert_layers(self.policy)),
            num_heads=num_heads(self.policy),
            encoding=self.encoding,
            image_shape=(*self.policy.config.image_resolution, 3) if self.store_images else None,
            action_shape=(int(self.policy.config.chunk_size), action_dim) if self.store_actions else None,
            store_language_tokens=True,
            prefix_layers=self.prefix_layers,
            extra_shapes=extra,
        )
        self.writer.start(spec)
        self.spec = spec

    def _check_layout(self, batch) -> None:
        layout = L.token_layout(self.policy, batch)
        if layout != self.spec.layout:
            raise CaptureError(
                f"the policy's token layout changed mid-run (cameras {layout.cameras} present "
                f"{layout.camera_present}, was {self.spec.layout.cameras} {self.spec.layout.camera_present}); "
                f"one store holds one layout: write another store"
            )

    def _next_buffers(self, b: int, device) -> HostBuffers:
        spec = self.spec
        shape = (b, *spec.attention_shape_per_inference)
        pshape = (b, *spec.prefix_attention_shape_per_inference) if spec.prefix_layers else None
        return self._ring.take(shape, pshape, device, self.inferences, getattr(self.writer, "pending", None))

    def _finish(self, run: _Inference, actions) -> None:
        import torch

        spec = self.spec
        if run.denoise_index + 1 != spec.num_denoise_steps:
            raise CaptureError(
                f"the model ran {run.denoise_index + 1} denoise steps, the store expects {spec.num_denoise_steps}; "
                f"keep num_steps at the config's num_inference_steps while recording"
            )
        if not run.copied:
            raise CaptureError(
                "no attention reached the recorder's hooks: the action expert did not run eager attention "
                "through its self_attn modules (is this lerobot 0.6.1's Pi0.5?)"
            )
        cuda = actions.is_cuda
        small = {"times": torch.cat(run.times).float()}
        if run.state is not None:
            small["state"] = run.state.float()
        if spec.action_shape is not None:
            small["actions"] = actions.float()
        if spec.image_shape is not None:
            if run.images is None:
                raise CaptureError("the policy did not call _preprocess_images; cannot store its images")
            small["images"] = L.images_as_uint8(run.images, spec.layout.camera_present)
        host = {k: to_host(v, cuda) for k, v in small.items()}
        times, ready = host["times"], None
        if cuda:
            # the writer thread waits for the non-blocking copies, then checks t (no sync here)
            event = torch.cuda.Event()
            event.record()
            times, ready = None, ready_after(event, host["times"], spec)
        ids, mask = run.language
        texts = self._token_text(ids, mask) if self._token_text is not None else np.full(ids.shape, "", dtype=str)
        b = len(run.episodes)
        batch = InferenceBatch(
            episodes=run.episodes,
            env_steps=np.full(b, run.env_step, dtype=np.int64),
            attention=run.buffers.attention,
            key_valid=L.key_valid(spec.layout, mask),
            times=times,
            language_token_id=ids,
            language_token_text=texts,
            images=host.get("images"),
            actions=host.get("actions"),
            prefix_attention=run.buffers.prefix,
            state=host.get("state"),
            keep=run.keep,
            ready=ready,
        )
        self.writer.append(batch)
        self.inferences += 1


# ---- helpers -------------------------------------------------------------------------------------
def _to_numpy(value) -> Any:
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return value
