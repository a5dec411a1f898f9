"""WriterStats: what an :class:`~attnstore.store.writer.AttentionWriter` did (rows, bytes, busy and wait time)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class WriterStats:
    rows: int = 0  # inference rows committed
    episodes: int = 0  # episode records committed
    attention_bytes: int = 0  # float32 bytes of attention handed over (before encoding)
    busy_seconds: float = 0.0  # time the writer thread spent encoding and writing
    max_queue_depth: int = 0
    store_bytes: int = 0  # size on disk at close
    wait_seconds: float = 0.0  # time the caller (the eval loop) was blocked in append/end_episode: writer behind
    waits: int = 0  # how many hand-overs had to wait for room in the queue
    queue_size: int = 0  # the queue's capacity (max_queue)

    @property
    def attention_mb_per_s(self) -> float:
        return self.attention_bytes / 1e6 / self.busy_seconds if self.busy_seconds else 0.0

    def postfix(self, depth: int | None = None) -> dict[str, str]:
        """Short fields for a progress bar (tqdm ``set_postfix``): queue depth, writer MB/s, time waited.

        >>> WriterStats(attention_bytes=8_000_000_000, busy_seconds=10.0, wait_seconds=2.5, queue_size=4).postfix(3)
        {'queue': '3/4', 'writer': '800MB/s', 'waited': '2.5s'}
        """
        out = {"queue": f"{self.max_queue_depth if depth is None else depth}/{self.queue_size}",
               "writer": f"{self.attention_mb_per_s:.0f}MB/s"}
        if self.wait_seconds >= 0.05:
            out["waited"] = f"{self.wait_seconds:.1f}s"
        return out


def directory_bytes(path: Path) -> int:
    """Total size of the files under ``path`` (the store's size on disk)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
