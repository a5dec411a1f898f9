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

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from attnstore import schema as S
from attnstore.capture import layout as L
from attnstore.capture.selection import Selection, parse_denoise_steps, parse_layers
from attnstore.errors import CaptureError
from attnstore.schema import StoreSpec
from attnstore.store.writer import AttentionWriter, InferenceBatch

_WRAPPED_POLICY_METHODS = ("reset", "select_action", "predict_action_chunk", "_preprocess_images")
_WRAPPED_MODEL_METHODS = ("denoise_step",)
_MISSING = object()


@dataclass
class _Inference:
    """State of the model run in progress."""

    batch: Any
    env_step: int
    keep: np.ndarray | None
    denoise_index: int = -1  # index of the denoise step running now
    slot: int = -1  # its position among the selected steps, -1 = not selected
    times: list[Any] = field(default_factory=list)
    images: Any = None
    img_masks: Any = None
    buffers: Any = None  # _Buffers of this run
    language: Any = None  # (ids with -1 at padding, mask) as numpy
    copied: bool = False


@dataclass
class _Buffers:
    attention: Any  # (B, D, L, H, Q, K) float32 host tensor
    prefix: Any  # (B, PL, H, P, P) float32 host tensor or None
    seq: int  # number of the append this buffer was last taken for


class AttentionRecorder:
    """Record a Pi0.5 policy's attention into an :class:`AttentionWriter` while it runs.

    Example::

        with AttentionWriter(out / "attention.zarr") as writer, \\
                AttentionRecorder(policy, writer, layers="last:2", tokenizer=find_tokenizer(pre)) as rec:
            policy.reset()                                  # a batch of B episodes starts
            action = policy.select_action(pre(observation))  # env step 0: the model runs, one row per env
            rec.set_active(~done)                            # finished envs stop being recorded

    Episodes: each ``policy.reset()`` after a batch that ran the model starts the next B episodes
    (``first_episode + batches_so_far * B + i``, lerobot-eval's numbering); ``set_episodes`` overrides.
    Env step: ``select_action`` calls since the last reset (the first is 0). Only calls that run the
    model (not those served from the action queue) are recorded.
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
        tokenizer=None,
        first_episode: int = 0,
        encoding: S.Encoding = "uint16",
    ) -> None:
        _check_policy(policy)
        if first_episode < 0:
            raise CaptureError(f"first_episode must be >= 0, got {first_episode}")
        if encoding not in S.ENCODINGS:
            raise CaptureError(f"encoding must be one of {S.ENCODINGS}, got {encoding!r}")
        self.policy = policy
        self.writer = writer
        expert_layers = _expert_layers(policy)
        self.layers = parse_layers(layers, len(expert_layers))
        self.denoise_steps = parse_denoise_steps(denoise_steps, int(policy.config.num_inference_steps))
        if prefix is False or prefix is None:
            self.prefix_layers: tuple[int, ...] = ()
        else:
            n_vlm = len(_vlm_layers(policy))
            self.prefix_layers = (
                parse_layers(layers, n_vlm, what="VLM layer")
                if prefix is True
                else parse_layers(prefix, n_vlm, what="VLM layer")
            )
        self.store_images = bool(images)
        self.store_actions = bool(actions)
        self.tokenizer = tokenizer
        self.encoding = encoding
        self.first_episode = int(first_episode)
        self.spec: StoreSpec | None = None
        self.inferences = 0
        self._token_text = L.TokenText(tokenizer) if tokenizer is not None else None
        self._handles: list[Any] = []
        self._saved: list[tuple[Any, str, Any]] = []
        self._attached = False
        self._current: _Inference | None = None
        self._ring: list[_Buffers] = []
        self._appended = 0  # batches this recorder handed to the writer
        self._reset_bookkeeping()

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
            expert = _expert_layers(policy)
            for slot, i in enumerate(self.layers):
                hook = torch.compiler.disable(self._make_expert_hook(slot))
                self._handles.append(expert[i].self_attn.register_forward_hook(hook, with_kwargs=True))
            vlm = _vlm_layers(policy)
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
        flags = np.asarray(_to_numpy(active), dtype=bool).reshape(-1)
        if self._batch_size is not None and len(flags) != self._batch_size:
            raise CaptureError(f"set_active: expected {self._batch_size} flags (the batch size), got {len(flags)}")
        self._active = flags

    def set_episodes(self, episodes) -> None:
        """Explicit episode indices of the current batch's rows (until the next ``policy.reset()``)."""
        values = np.asarray(_to_numpy(episodes), dtype=np.int64).reshape(-1)
        if (values < 0).any():
            raise CaptureError(f"set_episodes: episode indices must be >= 0, got {values.tolist()}")
        if self._batch_size is not None and len(values) != self._batch_size:
            raise CaptureError(f"set_episodes: expected {self._batch_size} indices (the batch size), got {len(values)}")
        self._episodes = values

    @property
    def env_step(self) -> int:
        """``select_action`` calls since the last reset (the env step of the next call)."""
        return self._env_step

    # ---- wrappers ----------------------------------------------------------------------------------
    def _wrap(self, owner, name: str, make: Callable[[Callable], Callable]) -> None:
        previous = owner.__dict__.get(name, _MISSING)
        original = getattr(owner, name)
        self._saved.append((owner, name, previous))
        owner.__dict__[name] = make(original)

    def _on_reset(self, original):
        def reset(*args, **kwargs):
            result = original(*args, **kwargs)
            if self._batch_size is not None and self._episodes is None:
                self._episode_base += self._batch_size
            elif self._batch_size is not None:
                self._episode_base = int(self._episodes.max()) + 1
            self._batch_size = None
            self._episodes = None
            self._active = None
            self._env_step = 0
            return result

        return reset

    def _on_select_action(self, original):
        def select_action(batch, *args, **kwargs):
            self._select_env_step = self._env_step
            try:
                return original(batch, *args, **kwargs)
            finally:
                self._select_env_step = None
                self._env_step += 1

        return select_action

    def _on_predict_action_chunk(self, original):
        def predict_action_chunk(batch, *args, **kwargs):
            env_step = self._select_env_step if self._select_env_step is not None else self._env_step
            run = self._begin(batch, env_step)
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
                self._current.images, self._current.img_masks = images, img_masks
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
            if run is None or run.slot < 0 or run.buffers is None:
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
            if run is None or run.buffers is None or run.buffers.prefix is None:
                return None
            if run.denoise_index >= 0:  # only the prefix pass, never a denoise step
                return None
            probs = output[1]
            run.buffers.prefix[:, layer_slot].copy_(probs, non_blocking=probs.is_cuda)
            return None

        return hook

    # ---- one inference -------------------------------------------------------------------------------
    def _begin(self, batch, env_step: int) -> _Inference | None:
        from lerobot.utils.constants import OBS_LANGUAGE_ATTENTION_MASK, OBS_LANGUAGE_TOKENS

        tokens = batch[OBS_LANGUAGE_TOKENS]
        b = int(tokens.shape[0])
        if self._batch_size is None:
            self._batch_size = b
        elif b != self._batch_size:
            raise CaptureError(
                f"batch size changed from {self._batch_size} to {b} without policy.reset(); "
                f"call policy.reset() when a new batch of episodes starts"
            )
        keep = None
        if self._active is not None:
            if len(self._active) != b:
                raise CaptureError(f"set_active got {len(self._active)} flags for a batch of {b}")
            if not self._active.any():
                return None  # every env finished: the model runs, nothing is recorded
            keep = self._active.copy()
        if self.spec is None:
            self._start_store(batch, tokens)
        else:
            self._check_layout(batch)
        run = _Inference(batch=batch, env_step=env_step, keep=keep)
        # ids and mask are inputs: fetching them before the model runs costs no wait for it
        mask = batch[OBS_LANGUAGE_ATTENTION_MASK].detach().cpu().numpy().astype(bool)
        ids = tokens.detach().cpu().numpy().astype(np.int32)
        run.language = (np.where(mask, ids, S.LANGUAGE_PAD_ID).astype(np.int32), mask)
        run.buffers = self._next_buffers(b, tokens.device)
        self._current = run
        return run

    def _start_store(self, batch, tokens) -> None:
        layout = L.token_layout(self.policy, batch)
        action_dim = int(self.policy.config.output_features["action"].shape[0])
        spec = StoreSpec(
            layout=layout,
            layers=self.layers,
            denoise_steps=self.denoise_steps,
            num_denoise_steps=int(self.policy.config.num_inference_steps),
            num_layers=len(_expert_layers(self.policy)),
            num_heads=_num_heads(self.policy),
            encoding=self.encoding,
            image_shape=(*self.policy.config.image_resolution, 3) if self.store_images else None,
            action_shape=(int(self.policy.config.chunk_size), action_dim) if self.store_actions else None,
            store_language_tokens=True,
            prefix_layers=self.prefix_layers,
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

    def _next_buffers(self, b: int, device) -> _Buffers:
        """Host buffers for one inference that the writer is not reading any more.

        The writer works FIFO, so of this recorder's batches only the last ``writer.pending`` can
        still be in use; older buffers are reused, and a new one is allocated only when all are busy
        (at most the writer's queue size + 2; usually 2 when the writer keeps up).
        """
        import torch

        spec = self.spec
        shape = (b, *spec.attention_shape_per_inference)
        pshape = (b, *spec.prefix_attention_shape_per_inference) if spec.prefix_layers else None
        if self._ring and tuple(self._ring[0].attention.shape) != shape:
            self._ring = []
        pending = getattr(self.writer, "pending", None)
        busy_from = self._appended - (len(self._ring) if pending is None else int(pending))
        for buffers in self._ring:
            # free: written already, or taken by a run that failed before it was handed over
            if buffers.seq < busy_from or buffers.seq >= self._appended:
                buffers.seq = self._appended
                return buffers
        pin = device.type == "cuda"
        buffers = _Buffers(
            attention=torch.zeros(shape, dtype=torch.float32, pin_memory=pin),
            prefix=torch.zeros(pshape, dtype=torch.float32, pin_memory=pin) if pshape else None,
            seq=self._appended,
        )
        self._ring.append(buffers)
        return buffers

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
        b = self._batch_size
        cuda = actions.is_cuda
        small = {"times": torch.cat(run.times).float()}
        if spec.action_shape is not None:
            small["actions"] = actions.float()
        if spec.image_shape is not None:
            if run.images is None:
                raise CaptureError("the policy did not call _preprocess_images; cannot store its images")
            small["images"] = L.images_as_uint8(run.images, spec.layout.camera_present)
        host = {k: _to_host(v, cuda) for k, v in small.items()}
        times, ready = host["times"], None
        if cuda:
            # the writer thread waits for the non-blocking copies, then checks t (no sync here)
            event = torch.cuda.Event()
            event.record()
            times, ready = None, _ready_after(event, host["times"], spec)
        ids, mask = run.language
        texts = self._token_text(ids, mask) if self._token_text is not None else np.full(ids.shape, "", dtype=str)
        episodes = (
            self._episodes
            if self._episodes is not None
            else np.arange(self._episode_base, self._episode_base + b, dtype=np.int64)
        )
        batch = InferenceBatch(
            episodes=episodes,
            env_steps=np.full(b, run.env_step, dtype=np.int64),
            attention=run.buffers.attention,
            key_valid=L.key_valid(spec.layout, mask),
            times=times,
            language_token_id=ids,
            language_token_text=texts,
            images=host.get("images"),
            actions=host.get("actions"),
            prefix_attention=run.buffers.prefix,
            keep=run.keep,
            ready=ready,
        )
        self.writer.append(batch)
        self._appended += 1
        self.inferences += 1

    def _reset_bookkeeping(self) -> None:
        self._episode_base = self.first_episode
        self._batch_size: int | None = None
        self._episodes: np.ndarray | None = None
        self._active: np.ndarray | None = None
        self._env_step = 0
        self._select_env_step: int | None = None


# ---- helpers -------------------------------------------------------------------------------------
def _check_policy(policy) -> None:
    try:
        from lerobot.policies.pi05.modeling_pi05 import PI05Policy
    except ImportError as exc:  # pragma: no cover - the capture extra is missing
        raise CaptureError(f"capturing needs lerobot[pi]==0.6.1 ({exc}); run 'make setup'") from exc
    if not isinstance(policy, PI05Policy):
        raise CaptureError(
            f"AttentionRecorder records lerobot's Pi0.5 (PI05Policy); got {type(policy).__name__}"
        )


def _expert_layers(policy) -> Sequence[Any]:
    return policy.model.paligemma_with_expert.gemma_expert.model.layers


def _vlm_layers(policy) -> Sequence[Any]:
    return policy.model.paligemma_with_expert.paligemma.model.language_model.layers


def _num_heads(policy) -> int:
    return int(policy.model.paligemma_with_expert.gemma_expert.config.num_attention_heads)


def _ready_after(event, host_times, spec: StoreSpec) -> Callable[[], None]:
    """Writer-thread callback: wait for the CUDA copies, then check the denoise times."""

    def ready() -> None:
        event.synchronize()
        got = host_times.numpy().astype(np.float64)
        if got.shape != (len(spec.times),) or not np.allclose(got, spec.times, atol=1e-5):
            raise CaptureError(f"denoise times {got.tolist()} differ from the store's {list(spec.times)}")

    return ready


def _to_host(tensor, cuda: bool):
    import torch

    tensor = tensor.detach()
    if not cuda or not tensor.is_cuda:
        return tensor.cpu()
    out = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    out.copy_(tensor, non_blocking=True)
    return out


def _to_numpy(value) -> Any:
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return value
