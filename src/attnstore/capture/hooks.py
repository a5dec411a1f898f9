"""The per-inference half of :class:`~attnstore.capture.recorder.AttentionRecorder`: its hooks, where they put
the probabilities, and the summaries computed from them.

Three paths, chosen per model run by the recorder (:class:`ModelRun` ``staged`` / ``device_path``):

* **held** (the CPU default): each expert hook keeps a *reference* to the probabilities lerobot's eager
  attention returned (a fresh tensor per call that nothing writes afterwards), so the inference thread pays
  no copy at all; the writer thread then quantises the stored layers into the batch's host buffer (uint16,
  as the device path hands over) and computes the summaries of every layer from the references
  (:func:`deferred_work`, run before it reads the batch);
* **device** (CUDA): each hook does one copy into a device staging buffer; once per model run the summaries
  of all layers run there in a few kernels, and the stored layers are quantised there
  (:func:`~attnstore.capture.buffers.quantise_on_device`), so only uint16 crosses to the host, in one copy;
* **per hook** (``staged=False``; tests): copies into the host buffer and summaries inside each hook.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from attnstore.capture.buffers import HostBuffers, check_finite_flags, quantise_into, quantise_on_device, to_host
from attnstore.capture.summary import SummaryBuffers
from attnstore.errors import CaptureError


@dataclass
class ModelRun:
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
    valid: Any = None  # (B, K) key validity on the device (SummaryPlan.key_valid)
    staged: bool = False  # held (CPU) or device path: the stored layers and summaries are done once per run
    device_path: bool = False  # ... on the device, at the end of the run (else: on the writer thread)


class RecorderHooks:
    """Hook factories and per-run capture of the recorder (mixed into AttentionRecorder: it reads
    ``spec``, ``adapter``, ``_current``, ``_plan``, ``_hooked`` and ``_staging`` of it)."""

    spec: Any
    adapter: Any
    _current: ModelRun | None
    _plan: Any
    _hooked: tuple[int, ...]
    _staging: Any

    def _make_expert_hook(self, layer_slot: int, summary_slot: int, staged_slot: int):
        """Hook of one expert layer: its full attention into slot ``layer_slot`` of the host buffer and
        its summary into slot ``summary_slot`` (-1: not stored / not summarised); on the held and device
        paths, one reference / one copy into slot ``staged_slot`` of the run's staging."""

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
            if run.device_path:
                self._staging_for(probs)[:, run.slot, staged_slot].copy_(probs)
            elif run.staged:  # held: no copy here; the writer thread reads it after the run
                run.buffers.staging[run.slot][staged_slot] = probs.detach()
            else:
                if layer_slot >= 0:
                    run.buffers.attention[:, run.slot, layer_slot].copy_(probs, non_blocking=probs.is_cuda)
                if summary_slot >= 0 and run.summary is not None:
                    put_summary(run.summary, (slice(None), run.slot, summary_slot), self._plan.expert(probs, run.valid))
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

    def _hold(self, run: ModelRun) -> None:
        """Held path: a fresh (denoise step x hooked layer) table of references for this run."""
        run.buffers.staging = [[None] * len(self._hooked) for _ in self.spec.denoise_steps]

    def _staging_for(self, probs):
        """The device path's staging buffer (B, D, hooked layers, H, Q, K) in the probabilities' dtype: one
        buffer reused across runs (stream order keeps a run's reads of it before the next run's copies)."""
        import torch

        shape = (probs.shape[0], len(self.spec.denoise_steps), len(self._hooked), *probs.shape[1:])
        buf = self._staging
        if buf is None or tuple(buf.shape) != shape or buf.dtype != probs.dtype or buf.device != probs.device:
            self._staging = buf = torch.empty(shape, dtype=probs.dtype, device=probs.device)
        return buf

    def _deferred(self, run: ModelRun) -> Callable[[], None]:
        """The held path's work for the writer thread (:func:`deferred_work` on this run)."""
        return deferred_work(run, self._hooked, self.spec, self._plan)

    def _summarise(self, run: ModelRun, staging) -> None:
        """The summaries of every layer from the device staging buffer: a few kernels per denoise step."""
        if run.summary is None or run.summary.region_mass is None:
            return
        summarised = positions(self._hooked, self.spec.summary_layers, staging.device)
        for d in range(staging.shape[1]):
            probs = staging[:, d] if summarised is None else staging[:, d].index_select(1, summarised)
            put_summary(run.summary, (slice(None), d), self._plan.expert(probs, run.valid))

    def _from_staging(self, run: ModelRun, cuda: bool):
        """Device path, once per model run: the summaries of every layer and the stored layers, quantised on
        the device and copied to the host once. Returns (host attention for the batch, host non-finite
        flags or None)."""
        import torch

        spec, staging = self.spec, self._staging
        self._summarise(run, staging)
        stored = positions(self._hooked, spec.layers, staging.device)
        att = staging if stored is None else staging.index_select(2, stored)
        host = run.buffers.attention
        if host.dtype != torch.int16:  # exact float32 encoding: the probabilities as they are
            host.copy_(att, non_blocking=cuda)
            return host, None
        bits, bad = quantise_on_device(att)
        host.copy_(bits, non_blocking=cuda)
        return host_attention(run.buffers), to_host(bad, cuda)


def deferred_work(run: ModelRun, hooked: tuple[int, ...], spec: Any, plan: Any) -> Callable[[], None]:
    """The held path's writer-thread callback: the stored layers' probabilities into the batch's host buffer
    (quantised there, :func:`~attnstore.capture.buffers.quantise_into`, when the encoding stores uint16;
    copied as they are for float32), every summarised layer's summaries, then the references dropped and
    the non-finite rows refused with the writer's message."""
    import torch

    # per hooked layer: (its slot among the stored layers, among the summarised ones), -1 = not; a layer's
    # quantisation and summary run back to back, while its probabilities are still in the cache
    slots = [(spec.layers.index(layer) if layer in spec.layers else -1,
              spec.summary_layers.index(layer) if layer in spec.summary_layers else -1) for layer in hooked]
    held = run.buffers.staging
    host = run.buffers.attention
    quantised = host.dtype == torch.int16  # the uint16 bits of a quantised encoding

    def ready() -> None:
        serial_torch()
        # lerobot-eval runs the policy under torch.inference_mode(): the run's tensors are inference
        # tensors, which only accept in-place writes inside inference mode (on this thread too)
        with torch.inference_mode():
            bits = host.view(torch.uint16) if quantised else None
            scratch, bad = None, None
            summaries = run.summary is not None and run.summary.region_mass is not None
            for d, layers in enumerate(held):
                for probs, (stored, summarised) in zip(layers, slots):
                    if stored >= 0 and bits is None:
                        host[:, d, stored].copy_(probs)
                    elif stored >= 0:
                        if scratch is None:
                            scratch = torch.empty(probs.shape, dtype=torch.float32)
                        flags = quantise_into(bits[:, d, stored], probs, scratch)
                        bad = flags if bad is None else bad | flags
                    if summarised >= 0 and summaries:
                        put_summary(run.summary, (slice(None), d, summarised), plan.expert(probs, run.valid))
        held.clear()  # the model's tensors can go
        if bad is not None:
            check_finite_flags(bad, run.episodes, run.env_step, run.keep)

    return ready


# ---- helpers -------------------------------------------------------------------------------------
_THREAD = threading.local()


def serial_torch() -> None:
    """Run torch's CPU ops on the calling thread (the writer's) single-threaded, from now on.

    torch's OpenMP gives every thread that runs a parallel op a team of its own. Once the writer thread
    had one beside the policy's, GNU OpenMP saw more threads than cores and stopped spin-waiting: every
    parallel region of the policy then paid a sleep and a wake-up, and the tiny policy's model runs
    stayed ~1.6x slower for the rest of the process, recorder detached or not (measured on 2 cores;
    ``tests/test_writer_throughput.py`` checks the thread counts). ``torch.set_num_threads(1)`` here
    sets this thread's OpenMP and MKL thread counts; the policy's thread keeps its own (a thread that
    first runs torch later starts with 1 too: torch keeps the last value set as its default).
    """
    if getattr(_THREAD, "serial", False):
        return
    import torch

    torch.set_num_threads(1)
    _THREAD.serial = True


def put_summary(out: SummaryBuffers, index: tuple, summary: tuple[Any, Any, Any]) -> None:
    """Copy one (mass, entropy, grid) of :meth:`SummaryPlan.expert` into the run's buffers at ``index``."""
    mass, ent, grid = summary
    out.region_mass[index].copy_(mass)
    out.entropy[index].copy_(ent)
    if out.grid is not None:
        out.grid[index].copy_(grid)


def host_attention(buffers: HostBuffers):
    """What the batch hands over: the float32 host buffer, or the uint16 view of the int16 one."""
    import torch

    att = buffers.attention
    return att.view(torch.uint16) if att.dtype == torch.int16 else att


def positions(hooked: tuple[int, ...], wanted: tuple[int, ...], device):
    """Index tensor of ``wanted`` layers among the ``hooked`` ones (None: all of them, in order)."""
    import torch

    if tuple(wanted) == tuple(hooked):
        return None
    return torch.tensor([hooked.index(i) for i in wanted], dtype=torch.long, device=device)


def slot(chosen: tuple[int, ...], index: int) -> int:
    """Position of layer ``index`` among ``chosen`` (-1: not chosen).

    >>> slot((16, 17), 17), slot((16, 17), 3)
    (1, -1)
    """
    return chosen.index(index) if index in chosen else -1
