"""Blosc's compression threads while writers are open: process-wide numcodecs settings, counted and restored.

Each :class:`~attnstore.store.writer.AttentionWriter` acquires :data:`BLOSC` with its ``encode_threads``
when it starts and releases it when it closes; the last one out restores what numcodecs had before.
"""

from __future__ import annotations

import os
import threading
from typing import Any


def default_encode_threads() -> int:
    """Blosc threads per chunk by default: the cores this process may run on, at most 4.

    >>> 1 <= default_encode_threads() <= 4
    True
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


class BloscThreads:
    """numcodecs' blosc thread settings while writers are open (process-wide, so counted and restored).

    numcodecs compresses single-threaded off the main thread (zarr encodes in worker threads) unless
    ``use_threads`` is True; then its global blosc context, with ``set_nthreads`` threads, serves every
    call under one lock. So: a write of fewer chunks than threads (B = 1: one attention chunk) compresses
    each chunk with blosc's threads (:meth:`intra` True); a write of many chunks (B >= threads) lets zarr
    compress them side by side in its thread pool, one thread each, without the lock (:meth:`intra` False).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users: list[int] = []
        self._saved: tuple[Any, int] | None = None

    def acquire(self, threads: int) -> None:
        from numcodecs import blosc

        with self._lock:
            if not self._users:
                self._saved = (blosc.use_threads, blosc.get_nthreads() if hasattr(blosc, "get_nthreads") else 1)
            self._users.append(threads)
            if max(self._users) > 1:
                blosc.set_nthreads(max(self._users))

    def intra(self, on: bool) -> None:
        """Blosc's own threads for the next writes (True), or zarr's chunk-level parallelism (False)."""
        from numcodecs import blosc

        with self._lock:
            if self._users and self._saved is not None:
                blosc.use_threads = True if on else self._saved[0]

    def restart_pool(self) -> None:
        """Stop blosc's thread pool, so that the next threaded compression (on a zarr worker whose nice value
        :mod:`attnstore.store.priority` raised) starts it again and its threads inherit that value; the
        thread count stays. A no-op while blosc is single-threaded."""
        from numcodecs import blosc

        with self._lock:  # (numcodecs' set_nthreads takes its own compression mutex)
            threads = blosc.get_nthreads() if hasattr(blosc, "get_nthreads") else 1
            if threads > 1:
                blosc.set_nthreads(1)  # c-blosc stops its pool when the count changes ...
                blosc.set_nthreads(threads)  # ... and starts one again at its next threaded compression

    def release(self) -> None:
        from numcodecs import blosc

        with self._lock:
            if not self._users:
                return
            self._users.pop()
            if self._users:
                blosc.set_nthreads(max(self._users))
            elif self._saved is not None:
                use_threads, threads = self._saved
                blosc.use_threads = use_threads
                blosc.set_nthreads(threads)


BLOSC = BloscThreads()  # the process's one instance (blosc's settings are global)
