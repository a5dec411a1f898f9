"""The writer's encoding yields the CPU to the policy: a nice value for the threads that encode (Linux).

On a machine with few cores the writer's encoding competes with torch's threads, and torch's parallel
regions wait for their slowest thread, so every millisecond the writer takes costs the policy about as
much. With ``AttentionWriter(nice=N)`` the writer thread raises its own nice value at start, and that of
zarr's event-loop thread (``zarr_io``) and of the worker threads where zarr runs its codecs (its own pool,
``zarr_pool_*``, or the loop's default executor, ``asyncio_*``); then it stops blosc's thread pool
(:meth:`~attnstore.store.blosc_threads.BloscThreads.restart_pool`), which the next threaded compression, on
one of those workers, starts again. Threads these create later (more workers, blosc's pool) inherit the
value. The scheduler then runs the encoding in the gaps the policy leaves (a real evaluation leaves many:
the simulation is single-threaded); when the writer still falls behind, the bounded queue slows the
evaluation as before, never dropping data.

Not the default: an unprivileged process cannot lower a nice value again, so zarr's threads keep it for
the rest of the process (reads included, which only matters while the CPU is contended), and on a node
whose every core is busy with other processes (many evaluations, each with torch's default thread count)
a nice writer gets only a small share of a core, and its evaluation waits on it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from typing import Any

MAX_NICE = 19


def check_nice(nice: int | None) -> int | None:
    """``nice`` if it is None or 0..19, else a ValueError that says so.

    >>> check_nice(None), check_nice(19)
    (None, 19)
    >>> check_nice(-1)
    Traceback (most recent call last):
    ...
    ValueError: nice must be 0..19 (a higher value yields more CPU to the policy) or None, got -1
    """
    if nice is not None and (isinstance(nice, bool) or not isinstance(nice, int) or not 0 <= nice <= MAX_NICE):
        raise ValueError(
            f"nice must be 0..{MAX_NICE} (a higher value yields more CPU to the policy) or None, got {nice!r}"
        )
    return nice


def zarr_threads(threads: Iterable[Any]) -> list[Any]:
    """The threads of zarr's I/O loop and codec workers among ``threads``, by name: ``zarr_io``, its pool
    ``zarr_pool_*`` (when ``threading.max_workers`` is set) or asyncio's default executor ``asyncio_*``
    (otherwise; in an evaluation the only asyncio loop is zarr's).

    >>> from types import SimpleNamespace as T
    >>> names = ["MainThread", "zarr_io", "zarr_pool_0", "asyncio_3", "attnstore-writer"]
    >>> [t.name for t in zarr_threads([T(name=n) for n in names])]
    ['zarr_io', 'zarr_pool_0', 'asyncio_3']
    """
    return [t for t in threads if t.name == "zarr_io" or t.name.startswith(("zarr_pool", "asyncio_"))]


def yield_to_policy(nice: int) -> list[int]:
    """Raise the nice value of the calling thread and zarr's threads to at least ``nice``; returns the
    native thread ids changed. A no-op where threads have no nice value of their own (not Linux) or the
    call is refused."""
    if not nice or not hasattr(os, "setpriority") or not os.path.isdir("/proc/self/task"):
        return []
    changed = []
    ids = [threading.get_native_id(), *(t.native_id for t in zarr_threads(threading.enumerate()))]
    for tid in dict.fromkeys(i for i in ids if i is not None):
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) < nice:  # PRIO_PROCESS with a thread id: that thread
                os.setpriority(os.PRIO_PROCESS, tid, nice)
                changed.append(tid)
        except OSError:  # the thread ended, or the call is not allowed: the writer works as before
            continue
    return changed
