"""Host-side buffers of the recorder: a small ring the hooks copy into and the writer reads from.

On CUDA the buffers are pinned and the copies non-blocking; the batch then carries a callback that the
writer thread runs (``ready_after``) to wait for them. On CPU the copies are plain.

On the device path (CUDA) the attention is quantised on the device before its one copy to the host
(:func:`quantise_on_device`: the writer's round(p * 65535), bit for bit): half the bytes over PCIe and no
cast on the writer thread. On the CPU's held path the writer thread quantises the model's probabilities
straight into the host buffer (:func:`quantise_into`): no float32 copy, and the writer gets uint16. The host
buffer then holds the uint16 bits as int16 (a cast every device supports) and is handed over as a uint16 view.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from attnstore.errors import CaptureError
from attnstore.schema import StoreSpec


@dataclass
class HostBuffers:
    """The host tensors of one inference (reused once the writer has written them)."""

    attention: Any  # (B, D, L, H, Q, K) float32 host tensor (int16 bits of uint16 on the device path)
    prefix: Any  # (B, PL, H, P, P) float32 host tensor or None
    seq: int  # number of the append this buffer was last taken for
    staging: Any = None  # CPU held path: per denoise step, per hooked layer, the model's probabilities (references)
    summary: Any = None  # the run's SummaryBuffers on the policy's device (reused with this buffer, see summaries)

    def summaries(self, spec: StoreSpec, device):
        """This buffer's per-layer summary tensors on ``device``, allocated once (every run writes all of
        them: allocating and zeroing them per run cost ~1 ms of the tiny model's 130 ms on the caller's thread)."""
        import torch

        from attnstore.capture.summary import SummaryBuffers

        device = torch.device(device)
        have = self.summary
        if have is None or have.batch_size != self.attention.shape[0] or have.device != device:
            self.summary = SummaryBuffers.allocate(spec, int(self.attention.shape[0]), device)
        return self.summary


class BufferRing:
    """Host buffers for one inference that the writer is not reading any more.

    The writer works FIFO, so of the recorder's batches only the last ``pending`` can still be in use;
    older buffers are reused, and a new one is allocated only when all are busy (at most the writer's
    queue size + 2; usually 2 when the writer keeps up).
    """

    def __init__(self) -> None:
        self._buffers: list[HostBuffers] = []

    def take(self, shape: tuple[int, ...], prefix_shape: tuple[int, ...] | None, device, appended: int,
             pending: int | None, dtype: Any = None) -> HostBuffers:
        """Buffers for the ``appended``-th batch; ``pending`` = batches the writer has not finished.
        ``dtype``: of the attention buffer (default float32; int16 for device-quantised attention)."""
        import torch

        dtype = torch.float32 if dtype is None else dtype
        first = self._buffers[0].attention if self._buffers else None
        if first is not None and (tuple(first.shape) != shape or first.dtype != dtype):
            self._buffers = []
        busy_from = appended - (len(self._buffers) if pending is None else int(pending))
        for buffers in self._buffers:
            # free: written already, or taken by a run that failed before it was handed over
            if buffers.seq < busy_from or buffers.seq >= appended:
                buffers.seq = appended
                return buffers
        pin = device.type == "cuda"
        buffers = HostBuffers(
            attention=torch.zeros(shape, dtype=dtype, pin_memory=pin),
            prefix=torch.zeros(prefix_shape, dtype=torch.float32, pin_memory=pin) if prefix_shape else None,
            seq=appended,
        )
        self._buffers.append(buffers)
        return buffers

    def __len__(self) -> int:
        return len(self._buffers)


def ready_after(event, host_times, spec: StoreSpec, nonfinite=None, where=None) -> Callable[[], None]:
    """Writer-thread callback: wait for the CUDA copies, then check the denoise times and, for attention
    quantised on the device, its per-row non-finite flags (``where``: (episodes, env step, keep) of the
    rows, as :func:`check_finite_flags` takes them)."""

    def ready() -> None:
        event.synchronize()
        got = host_times.numpy().astype(np.float64)
        if got.shape != (len(spec.times),) or not np.allclose(got, spec.times, atol=1e-5):
            raise CaptureError(f"denoise times {got.tolist()} differ from the store's {list(spec.times)}")
        if nonfinite is not None:
            check_finite_flags(nonfinite, *where)

    return ready


def quantise_on_device(x):
    """(int16 bits of uint16 round(p * 65535), per-row non-finite flags) of attention ``x`` (B, ...), on
    its device (:func:`scale_for_uint16`, then int32 -> int16, a cast every device supports, which keeps
    the low 16 bits).

    >>> import torch
    >>> bits, bad = quantise_on_device(torch.tensor([[0.0, 0.5, 1.0, 1.0000001, -1e-9]]))
    >>> bits.view(torch.uint16).tolist(), bad.tolist()
    ([[0, 32768, 65535, 65535, 0]], [False])
    """
    import torch

    scaled = torch.empty(x.shape, dtype=torch.float32, device=x.device)  # x (the staging buffer) stays as it is
    bad = scale_for_uint16(x, scaled)
    return scaled.to(torch.int32).to(torch.int16), bad


def quantise_into(dest, probs, scratch):
    """Held path (CPU): uint16 round(p * 65535) of ``probs`` (B, ...) into ``dest`` (a uint16 view of the
    same shape) through the float32 ``scratch`` (:func:`scale_for_uint16`); returns the per-row non-finite
    flags (B,).

    >>> import torch
    >>> p = torch.tensor([[0.0, 0.5, 1.0, 1.0000001, -1e-9]])
    >>> dest, scratch = torch.empty(p.shape, dtype=torch.uint16), torch.empty(p.shape)
    >>> quantise_into(dest, p, scratch).tolist(), dest.tolist()
    ([False], [[0, 32768, 65535, 65535, 0]])
    """
    bad = scale_for_uint16(probs, scratch)
    dest.copy_(scratch)  # float -> uint16 truncates, as numpy's astype does
    return bad


def scale_for_uint16(probs, out):
    """``out`` (float32) = clip(p * 65535 + 0.5, 0, 65535), whose truncation is the stored integer, and the
    per-row non-finite flags (B,) of ``probs`` (B, ...). The same float32 operations as
    :func:`attnstore.schema.encoding.quantise` (multiply, add 0.5, clip), so the integers are bit-identical
    to the writer's; the non-finite test is the row sum (NaN and inf survive it): one reduction."""
    import torch

    from attnstore.schema.encoding import UINT16_SCALE

    torch.mul(probs, float(UINT16_SCALE), out=out)
    bad = ~torch.isfinite(out.reshape(out.shape[0], -1).sum(dim=1))
    out.add_(0.5).clamp_(0.0, float(UINT16_SCALE))
    return bad


def check_finite_flags(nonfinite, episodes, env_step, keep=None) -> None:
    """Raise the writer's one-line error for the first row flagged by :func:`quantise_on_device` or
    :func:`quantise_into` (of the rows ``keep`` stores, when given)."""
    from attnstore.errors import SchemaError
    from attnstore.store.batch import nonfinite_message

    flags = np.asarray(nonfinite.numpy() if hasattr(nonfinite, "numpy") else nonfinite, dtype=bool).reshape(-1)
    if keep is not None:
        flags = flags & np.asarray(keep, dtype=bool).reshape(-1)
    if flags.any():
        i = int(np.flatnonzero(flags)[0])
        raise SchemaError(nonfinite_message("attention", int(env_step), int(episodes[i])))


def to_host(tensor, cuda: bool):
    import torch

    tensor = tensor.detach()
    if not cuda or not tensor.is_cuda:
        return tensor.cpu()
    out = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    out.copy_(tensor, non_blocking=True)
    return out
