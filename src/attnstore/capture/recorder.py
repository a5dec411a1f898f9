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
does the encoding and disk I/O. On CUDA the hooks copy into a device staging buffer, quantised and copied
to pinned host buffers once per run, and the batch carries an event the writer waits on; on CPU the hooks
only keep references and the writer thread quantises (or copies) and summarises them
(:mod:`attnstore.capture.hooks`). Hooks are wrapped in ``torch.compiler.disable`` so ``compile_model=True``
graphs break around them instead of recompiling every step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from attnstore import schema as S
from attnstore.capture import layout as L
from attnstore.capture.buffers import BufferRing, HostBuffers, check_finite_flags, ready_after, to_host
from attnstore.capture.episodes import EpisodeBook
from attnstore.capture.hooks import ModelRun, RecorderHooks, host_attention, slot
from attnstore.capture.policies import adapter_for
from attnstore.capture.summary import SummaryPlan
from attnstore.selection import Selection, parse_denoise_steps, parse_layers
from attnstore.errors import CaptureError
from attnstore.schema import StoreSpec
from attnstore.schema.encoding import QUANTISED
from attnstore.store.writer import AttentionWriter, InferenceBatch

_MISSING = object()


_Inference = ModelRun  # the name before the split into capture/hooks.py


class AttentionRecorder(RecorderHooks):
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

    ``summary=True`` (default) also stores, for every expert layer (and every VLM layer when ``prefix``
    is on), whatever ``layers`` keeps in full, the per-layer summaries of :mod:`attnstore.capture.summary`
    (region mass and entropy per head and action token, camera grids), computed on the policy's device.
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
        encoding: S.Encoding = S.DEFAULT_ENCODING,
        summary: bool = True,
    ) -> None:
        self.adapter = adapter_for(policy)  # everything policy-specific (Pi0.5, Pi0, SmolVLA)
        self.episodes = EpisodeBook(first_episode)
        if encoding not in S.ENCODINGS:
            raise CaptureError(f"encoding must be one of {S.ENCODINGS}, got {encoding!r}")
        self.policy = policy
        self.writer = writer
        self.layers = parse_layers(layers, len(self.adapter.expert_layers()))
        self.denoise_steps = parse_denoise_steps(denoise_steps, self.adapter.num_denoise_steps())
        if prefix is False or prefix is None:
            self.prefix_layers: tuple[int, ...] = ()
        else:
            n_vlm = len(self.adapter.vlm_layers())
            self.prefix_layers = (
                parse_layers(layers, n_vlm, what="VLM layer")
                if prefix is True
                else parse_layers(prefix, n_vlm, what="VLM layer")
            )
        self.summary_layers = tuple(range(len(self.adapter.expert_layers()))) if summary else ()
        self.summary_prefix_layers = (
            tuple(range(len(self.adapter.vlm_layers()))) if summary and self.prefix_layers else ()
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
        self._current: ModelRun | None = None
        self._ring = BufferRing()
        self._plan: SummaryPlan | None = None
        # expert layers with a hook: stored in full, summarised, or both (their order in the staging buffer)
        self._hooked = tuple(sorted(set(self.layers) | set(self.summary_layers)))
        # The paths of capture/hooks.py: held (CPU default: the hooks keep references, the writer thread quantises
        # and summarises), device (CUDA default: one device staging buffer, summaries and quantisation there).
        # _stage_summaries=False: the per-hook path (copies and summaries in each hook; no staging memory).
        # _device_path=True forces the device path on the CPU (tests: every line of it runs without CUDA).
        self._stage_summaries: bool | None = None
        self._device_path: bool | None = None
        self._staging: Any = None  # the device path's staging buffer

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
            policy, model = self.policy, self.adapter.denoise_owner()
            self._wrap(policy, "reset", self._on_reset)
            self._wrap(policy, "select_action", self._on_select_action)
            self._wrap(policy, self.adapter.chunk_method, self._on_predict_action_chunk)
            self._wrap(policy, self.adapter.images_method, self._on_preprocess_images)
            self._wrap(model, "denoise_step", self._on_denoise_step)
            for register, stored, summarised, make in (
                (self.adapter.register_expert_hook, self.layers, self.summary_layers, self._make_expert_hook),
                (self.adapter.register_prefix_hook, self.prefix_layers, self.summary_prefix_layers, self._make_prefix_hook),
            ):
                for i in sorted(set(stored) | set(summarised)):
                    slots = (slot(stored, i), slot(summarised, i), slot(self._hooked, i))
                    hook = torch.compiler.disable(make(*slots))
                    self._handles.append(register(i, hook))
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
            timestep = self.adapter.denoise_timestep(args, kwargs)
            note_step(timestep)
            return original(*args, **kwargs)

        return denoise_step

    # ---- one inference -------------------------------------------------------------------------------
    def _begin(self, batch) -> ModelRun | None:
        from lerobot.utils.constants import OBS_STATE

        tokens, mask_tensor = self.adapter.language(batch)  # as long as the layout's language region
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
        mask = mask_tensor.detach().cpu().numpy().astype(bool)
        ids = tokens.detach().cpu().numpy().astype(np.int32)
        summary, valid = None, None
        if self.spec.summary_layers or self.spec.summary_prefix_layers:
            if self._plan is None or self._plan.device != tokens.device:
                self._plan = SummaryPlan(self.spec.layout, tokens.device)
            valid = self._plan.key_valid(mask_tensor.detach())
        staged = True if self._stage_summaries is None else self._stage_summaries
        device_path = staged and (tokens.device.type == "cuda" if self._device_path is None else self._device_path)
        buffers = self._next_buffers(b, tokens.device, bool(staged))
        if valid is not None:
            summary = buffers.summaries(self.spec, tokens.device)
        run = ModelRun(
            episodes=episodes,
            env_step=self.episodes.env_step,
            keep=keep,
            buffers=buffers,
            language=(np.where(mask, ids, S.LANGUAGE_PAD_ID).astype(np.int32), mask),
            state=batch[OBS_STATE] if S.STATE in self.spec.extra_shapes else None,
            summary=summary,
            valid=valid,
            staged=bool(staged),
            device_path=bool(device_path),
        )
        if run.staged and not run.device_path:
            self._hold(run)
        self._current = run
        return run

    def _start_store(self, batch) -> None:
        from lerobot.utils.constants import OBS_STATE

        layout = self.adapter.token_layout(batch)
        action_dim = int(self.policy.config.output_features["action"].shape[0])
        extra = {}
        if self.store_state and OBS_STATE in batch:
            extra[S.STATE] = tuple(int(v) for v in batch[OBS_STATE].shape[1:])
        spec = StoreSpec(
            layout=layout,
            layers=self.layers,
            denoise_steps=self.denoise_steps,
            num_denoise_steps=self.adapter.num_denoise_steps(),
            num_layers=len(self.adapter.expert_layers()),
            num_heads=self.adapter.num_heads(),
            encoding=self.encoding,
            image_shape=self.adapter.image_shape(batch) if self.store_images else None,
            action_shape=(int(self.policy.config.chunk_size), action_dim) if self.store_actions else None,
            store_language_tokens=True,
            prefix_layers=self.prefix_layers,
            extra_shapes=extra,
            summary_layers=self.summary_layers,
            summary_prefix_layers=self.summary_prefix_layers,
            layer_kinds=self.adapter.store_layer_kinds(self.layers),
        )
        self.writer.start(spec)
        self.spec = spec

    def _check_layout(self, batch) -> None:
        layout = self.adapter.token_layout(batch)
        if layout != self.spec.layout:
            raise CaptureError(
                f"the policy's token layout changed mid-run (cameras {layout.cameras} present "
                f"{layout.camera_present}, was {self.spec.layout.cameras} {self.spec.layout.camera_present}); "
                f"one store holds one layout: write another store"
            )

    def _next_buffers(self, b: int, device, staged: bool = False) -> HostBuffers:
        import torch

        spec = self.spec
        shape = (b, *spec.attention_shape_per_inference)
        pshape = (b, *spec.prefix_attention_shape_per_inference) if spec.prefix_layers else None
        # quantised encodings: the uint16 bits (as int16) on the device and the held path; float32 per hook
        dtype = torch.int16 if staged and spec.encoding in QUANTISED else torch.float32
        return self._ring.take(shape, pshape, device, self.inferences, getattr(self.writer, "pending", None), dtype)

    def _finish(self, run: ModelRun, actions) -> None:
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
        attention, nonfinite, deferred = run.buffers.attention, None, None
        if run.device_path:
            attention, nonfinite = self._from_staging(run, cuda)
        elif run.staged:  # held: stored layers and summaries on the writer thread, before it reads the batch
            attention, deferred = host_attention(run.buffers), self._deferred(run)
        small = {"times": torch.cat(run.times).float()}
        if run.state is not None:
            small["state"] = run.state.float()
        if spec.action_shape is not None:
            small["actions"] = actions.float()
        if spec.image_shape is not None:
            if run.images is None:
                raise CaptureError("the policy did not call _preprocess_images; cannot store its images")
            small["images"] = L.images_as_uint8(run.images, spec.layout.camera_present)
        if run.summary is not None:
            small.update(run.summary.variables())
        host = {k: to_host(v, cuda) for k, v in small.items()}
        times, ready = host["times"], None
        if cuda:
            # the writer thread waits for the non-blocking copies, then checks t (no sync here)
            event = torch.cuda.Event()
            event.record()
            times, ready = None, ready_after(event, host["times"], spec, nonfinite,
                                                  (run.episodes, run.env_step, run.keep))
        elif nonfinite is not None:
            check_finite_flags(nonfinite, run.episodes, run.env_step, run.keep)
        if deferred is not None:
            ready = deferred
        ids, mask = run.language
        texts = self._token_text(ids, mask) if self._token_text is not None else np.full(ids.shape, "", dtype=str)
        b = len(run.episodes)
        batch = InferenceBatch(
            episodes=run.episodes,
            env_steps=np.full(b, run.env_step, dtype=np.int64),
            attention=attention,
            key_valid=self.adapter.key_valid(spec.layout, mask),
            times=times,
            language_token_id=ids,
            language_token_text=texts,
            images=host.get("images"),
            actions=host.get("actions"),
            prefix_attention=run.buffers.prefix,
            state=host.get("state"),
            keep=run.keep,
            ready=ready,
            **{name: host[name] for name in (run.summary.variables() if run.summary is not None else ())},
        )
        self.writer.append(batch)
        self.inferences += 1


def _to_numpy(value) -> Any:
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return value
