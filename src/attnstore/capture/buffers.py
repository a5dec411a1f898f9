"""Host-side buffers of the recorder: a small ring the hooks copy into and the writer reads from.

On CUDA the buffers are pinned and the copies non-blocking; the batch then carries a callback that the
writer thread runs (``ready_after``) to wait for them. On CPU the copies are plain.
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

    attention: Any  # (B, D, L, H, Q, K) float32 host tensor
    prefix: Any  # (B, PL, H, P, P) float32 host tensor or None
    seq: int  # number of the append this buffer was last taken for


class BufferRing:
    """Host buffers for one inference that the writer is not reading any more.

    The writer works FIFO, so of the recorder's batches only the last ``pending`` can still be in use;
    older buffers are reused, and a new one is allocated only when all are busy (at most the writer's
    queue size + 2; usually 2 when the writer keeps up).
    """

    def __init__(self) -> None:
        self._buffers: list[HostBuffers] = []

    def take(self, shape: tuple[int, ...], prefix_shape: tuple[int, ...] | None, device, appended: int,
             pending: int | None) -> HostBuffers:
        """Buffers for the ``appended``-th batch; ``pending`` = batches the writer has not finished."""
        import torch

        if self._buffers and tuple(self._buffers[0].attention.shape) != shape:
            self._buffers = []
        busy_from = appended - (len(self._buffers) if pending is None else int(pending))
        for buffers in self._buffers:
            # free: written already, or taken by a run that failed before it was handed over
            if buffers.seq < busy_from or buffers.seq >= appended:
                buffers.seq = appended
                return buffers
        pin = device.type == "cuda"
        buffers = HostBuffers(
            attention=torch.zeros(shape, dtype=torch.float32, pin_memory=pin),
            prefix=torch.zeros(prefix_shape, dtype=torch.float32, pin_memory=pin) if prefix_shape else None,
            seq=appended,
        )
        self._buffers.append(buffers)
        return buffers

    def __len__(self) -> int:
        return len(self._buffers)


def ready_after(event, host_times, spec: StoreSpec) -> Callable[[], None]:
    """Writer-thread callback: wait for the CUDA copies, then check the denoise times."""

    def ready() -> None:
        event.synchronize()
        got = host_times.numpy().astype(np.float64)
        if got.shape != (len(spec.times),) or not np.allclose(got, spec.times, atol=1e-5):
            raise CaptureError(f"denoise times {got.tolist()} differ from the store's {list(spec.times)}")

    return ready


def to_host(tensor, cuda: bool):
    import torch

    tensor = tensor.detach()
    if not cuda or not tensor.is_cuda:
        return tensor.cpu()
    out = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    out.copy_(tensor, non_blocking=True)
    return out
