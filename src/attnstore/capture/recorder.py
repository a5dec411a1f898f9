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
from attnstore.capture.buffers import (
    BufferRing,
    HostBuffers,
    check_finite_flags,
    quantise_on_device,
    ready_after,
    to_host,
)
from attnstore.capture.episodes import EpisodeBook
from attnstore.capture.policies import adapter_for
from attnstore.capture.summary import SummaryBuffers, SummaryPlan
from attnstore.selection import Selection, parse_denoise_steps, parse_layers
from attnstore.errors import CaptureError
from attnstore.schema import StoreSpec
from attnstore.schema.encoding import QUANTISED
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
    summary: SummaryBuffers | None = None  # per-layer summaries, on the policy's device
    valid: Any = None  # (B, K, R + 1) region one-hot + key validity on the device (SummaryPlan.key_valid)
    staged: bool = False  # hooks copy every hooked layer into a staging buffer; summarised once per run
    device_path: bool = False  # ... and the stored layers are quantised where they are, at the end of the run


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
        self._current: _Inference | None = None
        self._ring = BufferRing()
        self._plan: SummaryPlan | None = None
        # expert layers with a hook: stored in full, summarised, or both (their order in the staging buffer)
        self._hooked = tuple(sorted(set(self.layers) | set(self.summary_layers)))
        # The staged path (the default): each hook does one copy into a staging buffer, and once per model
        # run the summaries come from it in a few kernels over all layers (SummaryPlan.expert).
        # * The device path (CUDA): that runs on the device at the end of the run (one device buffer,
        #   stream-ordered), and the stored layers are quantised there too (quantise_on_device), so only
        #   uint16 crosses to the host, in one copy.
        # * On the CPU the summaries run on the writer thread (the batch's ready callback; a staging buffer
        #   per ring slot), so the inference thread pays one copy per hook; the stored layers are also
        #   copied as float32 into the batch (the writer quantises, as before).
        # _stage_summaries=False: the per-hook path (summaries in each hook; no staging memory).
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
                    slots = (_slot(stored, i), _slot(summarised, i), _slot(self._hooked, i))
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

    # ---- hooks -------------------------------------------------------------------------------------
    def _make_expert_hook(self, layer_slot: int, summary_slot: int, staged_slot: int):
        """Hook of one expert layer: its full attention into slot ``layer_slot`` of the host buffer and
        its summary into slot ``summary_slot`` (-1: not stored / not summarised); on the device path,
        only one copy into slot ``staged_slot`` of the staging buffer."""

        def hook(module, args, kwargs, output):
            run = self._current
            if run is None or run.slot < 0:
                return None
            probs = output[1]
            expected = run.buffers.attention.shape[-2:]
            if tuple(probs.shape[-2:]) != tuple(expected):
                raise CaptureError(
                    f"expert attention has shape {tuple(probs.shape)}, the token layout expects "
                    f"(B, H, {expected[0]}, {expected[1]}); is this a {self.adapter.label} with an unexpected input?"
                )
            if run.staged:
                self._staging_for(run, probs)[:, run.slot, staged_slot].copy_(probs)
                if not run.device_path and layer_slot >= 0:  # CPU: the float32 rows go to the writer as they are
                    run.buffers.attention[:, run.slot, layer_slot].copy_(probs)
            else:
                if layer_slot >= 0:
                    run.buffers.attention[:, run.slot, layer_slot].copy_(probs, non_blocking=probs.is_cuda)
                if summary_slot >= 0 and run.summary is not None:
                    _put_summary(run.summary, (slice(None), run.slot, summary_slot), self._plan.expert(probs, run.valid))
            run.copied = True
            return None

        return hook

    def _make_prefix_hook(self, layer_slot: int, summary_slot: int, _staged_slot: int):
        def hook(module, args, kwargs, output):
            run = self._current
            if run is None or run.denoise_index >= 0:  # only the prefix pass, never a denoise step
                return None
            probs = output[1]
            if layer_slot >= 0 and run.buffers.prefix is not None:
                run.buffers.prefix[:, layer_slot].copy_(probs, non_blocking=probs.is_cuda)
            out = run.summary
            if summary_slot >= 0 and out is not None and out.prefix_region_mass is not None:
                mass, ent = self._plan.prefix(probs, run.valid)
                out.prefix_region_mass[:, summary_slot].copy_(mass)
                out.prefix_entropy[:, summary_slot].copy_(ent)
            return None

        return hook

    # ---- one inference -------------------------------------------------------------------------------
    def _begin(self, batch) -> _Inference | None:
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
            summary = SummaryBuffers.allocate(self.spec, b, tokens.device)
            valid = self._plan.key_valid(mask_tensor.detach())
        staged = True if self._stage_summaries is None else self._stage_summaries
        device_path = staged and (tokens.device.type == "cuda" if self._device_path is None else self._device_path)
        staged = staged and (device_path or summary is not None)  # CPU without summaries: nothing to stage
        run = _Inference(
            episodes=episodes,
            env_step=self.episodes.env_step,
            keep=keep,
            buffers=self._next_buffers(b, tokens.device, device_path),
            language=(np.where(mask, ids, S.LANGUAGE_PAD_ID).astype(np.int32), mask),
            state=batch[OBS_STATE] if S.STATE in self.spec.extra_shapes else None,
            summary=summary,
            valid=valid,
            staged=bool(staged),
            device_path=bool(device_path),
        )
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

    def _next_buffers(self, b: int, device, device_path: bool = False) -> HostBuffers:
        import torch

        spec = self.spec
        shape = (b, *spec.attention_shape_per_inference)
        pshape = (b, *spec.prefix_attention_shape_per_inference) if spec.prefix_layers else None
        dtype = torch.int16 if device_path and spec.encoding in QUANTISED else torch.float32
        return self._ring.take(shape, pshape, device, self.inferences, getattr(self.writer, "pending", None), dtype)

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
        attention, nonfinite, deferred = run.buffers.attention, None, None
        if run.device_path:
            attention, nonfinite = self._from_staging(run, cuda)
        elif run.staged and run.summary is not None:  # the summaries run on the writer thread, before it reads
            deferred = self._deferred(run)
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
            times, ready = None, ready_after(event, host["times"], spec, nonfinite, (run.episodes, run.env_step))
        elif nonfinite is not None:
            check_finite_flags(nonfinite, run.episodes, run.env_step)
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

    def _staging_for(self, run: _Inference, probs):
        """The staging buffer (B, D, hooked layers, H, Q, K) in the probabilities' dtype. On CUDA one device
        buffer reused across runs (stream order keeps a run's reads of it before the next run's copies); on
        the CPU the run's ring slot's own (the writer thread reads it after the run)."""
        import torch

        shape = (probs.shape[0], len(self.spec.denoise_steps), len(self._hooked), *probs.shape[1:])

        def fits(buf) -> bool:
            return buf is not None and tuple(buf.shape) == shape and buf.dtype == probs.dtype and buf.device == probs.device

        if run.device_path:
            if not fits(self._staging):
                self._staging = torch.empty(shape, dtype=probs.dtype, device=probs.device)
            return self._staging
        if not fits(run.buffers.staging):
            run.buffers.staging = torch.empty(shape, dtype=probs.dtype)
        return run.buffers.staging

    def _deferred(self, run: _Inference) -> Callable[[], None]:
        """The CPU staged path's work for the writer thread: the summaries of every layer of the run."""

        def ready() -> None:
            import torch

            # lerobot-eval runs the policy under torch.inference_mode(): the run's tensors are inference
            # tensors, which only accept in-place writes inside inference mode (on this thread too)
            with torch.inference_mode():
                self._summarise(run, run.buffers.staging)

        return ready

    def _summarise(self, run: _Inference, staging) -> None:
        """The summaries of every layer from the staging buffer: a few kernels per denoise step, all layers at once."""
        if run.summary is None or run.summary.region_mass is None:
            return
        summarised = _positions(self._hooked, self.spec.summary_layers, staging.device)
        for d in range(staging.shape[1]):
            probs = staging[:, d] if summarised is None else staging[:, d].index_select(1, summarised)
            _put_summary(run.summary, (slice(None), d), self._plan.expert(probs, run.valid))

    def _from_staging(self, run: _Inference, cuda: bool):
        """Device path, once per model run: the summaries of every layer and the stored layers, quantised on
        the device and copied to the host once. Returns (host attention for the batch, host non-finite
        flags or None)."""
        import torch

        spec, staging = self.spec, self._staging
        self._summarise(run, staging)
        stored = _positions(self._hooked, spec.layers, staging.device)
        att = staging if stored is None else staging.index_select(2, stored)
        host = run.buffers.attention
        if host.dtype != torch.int16:  # exact float32 encoding: the probabilities as they are
            host.copy_(att, non_blocking=cuda)
            return host, None
        bits, bad = quantise_on_device(att)
        host.copy_(bits, non_blocking=cuda)
        return _host_attention(run.buffers), to_host(bad, cuda)


# ---- helpers -------------------------------------------------------------------------------------
def _put_summary(out: SummaryBuffers, index: tuple, summary: tuple[Any, Any, Any]) -> None:
    """Copy one (mass, entropy, grid) of :meth:`SummaryPlan.expert` into the run's buffers at ``index``."""
    mass, ent, grid = summary
    out.region_mass[index].copy_(mass)
    out.entropy[index].copy_(ent)
    if out.grid is not None:
        out.grid[index].copy_(grid)


def _host_attention(buffers: HostBuffers):
    """What the batch hands over: the float32 host buffer, or the uint16 view of the int16 one."""
    import torch

    att = buffers.attention
    return att.view(torch.uint16) if att.dtype == torch.int16 else att


def _positions(hooked: tuple[int, ...], wanted: tuple[int, ...], device):
    """Index tensor of ``wanted`` layers among the ``hooked`` ones (None: all of them, in order)."""
    import torch

    if tuple(wanted) == tuple(hooked):
        return None
    return torch.tensor([hooked.index(i) for i in wanted], dtype=torch.long, device=device)


def _slot(chosen: tuple[int, ...], index: int) -> int:
    """Position of layer ``index`` among ``chosen`` (-1: not chosen).

    >>> _slot((16, 17), 17), _slot((16, 17), 3)
    (1, -1)
    """
    return chosen.index(index) if index in chosen else -1


def _to_numpy(value) -> Any:
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return value
