"""AttentionWriter: append inferences to a Zarr v3 attention store from a background thread.

The caller (the inference loop) hands over one :class:`InferenceBatch` per policy inference and goes
on; a single background thread encodes and writes it. The queue between them is bounded, so a slow
disk slows the caller down (back-pressure) instead of filling RAM.

Crash safety: every row is written data-first and its ``episode`` index last (the commit marker),
then the root ``zarr.json``'s consolidated shapes are replaced (:mod:`attnstore.store.snapshot`).
Each chunk is written whole (one chunk per inference row for the large arrays), and zarr's local
store replaces files by rename, so a killed process leaves every committed row readable, the
uncommitted ones invisible (their ``episode`` reads as the fill value -1), and arrays whose
consolidated shapes agree, for plain ``xr.open_zarr`` too.

Throughput (the writer must keep up with a GPU): attention may arrive already quantised (uint16, as the
recorder makes it on CUDA before the device-to-host copy), which halves the bytes and skips the cast;
blosc compresses with ``encode_threads`` threads; chunks are written without zarr's "is it all fill
value?" pass. When the thread still falls behind, ``append`` blocks (the eval slows, nothing is dropped)
and :attr:`WriterStats.wait_seconds` says for how long.

This module holds the queue, the thread and the commit protocol; what is handed over and its checks are in
:mod:`attnstore.store.batch`, blosc's process-wide threads in :mod:`attnstore.store.blosc_threads`, the
counters in :mod:`attnstore.store.stats` (all importable from here, as before).
"""

from __future__ import annotations

import errno
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from attnstore import schema as S
from attnstore.errors import AttnStoreError, SchemaError, WriterError
from attnstore.schema import EpisodeRecord, StoreSpec
from attnstore.schema.encoding import QUANTISED
from attnstore.store import codecs as _codecs  # noqa: F401 - registers the compact encoding's zarr codec
from attnstore.store.batch import (
    InferenceBatch,
    as_numpy,
    check_finite,
    is_uint16,
    quantise_attention,
    take_rows,
    validate_batch,
)
from attnstore.store.blosc_threads import BLOSC, default_encode_threads
from attnstore.store.create import WriteMode, open_for_writing, preflight
from attnstore.store.lock import release_lock
from attnstore.store.priority import check_nice, yield_to_policy
from attnstore.store.snapshot import Snapshot
from attnstore.store.stats import WriterStats, directory_bytes

__all__ = ["ARRAY_CONFIG", "PROGRESS_INTERVAL_S", "AttentionWriter", "InferenceBatch", "WriterStats",
           "default_encode_threads", "directory_bytes"]

_STOP = object()
# zarr array config of the writer's arrays: chunks are always written (never compared with the fill value
# first: that is a full extra pass over every chunk, and a row is never all fill value). The benchmark sets
# {} to measure the previous path.
ARRAY_CONFIG: dict[str, Any] = {"write_empty_chunks": True}
PROGRESS_INTERVAL_S = 2.0  # on_progress is called at most this often (and whenever append had to wait)


@dataclass
class _State:
    error: BaseException | None = None
    stats: WriterStats = field(default_factory=WriterStats)


class AttentionWriter:
    """Append-only writer of one attention store.

    Example::

        with AttentionWriter("out/attention.zarr", spec, run={"task": "libero_object"}) as writer:
            writer.append(InferenceBatch(episodes=[0], env_steps=[0], attention=probs, key_valid=valid))
            writer.end_episode(EpisodeRecord(episode=0, success=True, num_env_steps=280))

    ``mode``: ``create`` (the path must not exist), ``overwrite`` (replace an existing attnstore store,
    never anything else) or ``append`` (add to an existing store with the same spec).

    ``encode_threads``: blosc threads compressing each chunk (default: the cores this process may use,
    at most 4; 1 = single-threaded). Blosc's thread setting is process-wide: while a writer runs, blosc
    calls of the process (reads too) use its threads, serialised by numcodecs' lock; it is restored when
    the last writer closes. ``on_progress(stats)``, when set, is called from ``append`` on the caller's
    thread at most every :data:`PROGRESS_INTERVAL_S` seconds and after every wait (for a progress bar:
    ``bar.set_postfix(writer.stats.postfix(writer.queue_depth))``). ``nice`` (0..19, Linux): the writer
    thread and zarr's encoding threads yield the CPU to the policy (:mod:`attnstore.store.priority`, which
    says why it is not the default).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        spec: StoreSpec | None = None,
        *,
        run: Mapping[str, Any] | None = None,
        mode: WriteMode = "create",
        max_queue: int = 4,
        encode_threads: int | None = None,
        on_progress: Callable[[WriterStats], None] | None = None,
        nice: int | None = None,
    ) -> None:
        if max_queue < 1:
            raise WriterError(f"max_queue must be >= 1, got {max_queue}")
        if encode_threads is not None and encode_threads < 1:
            raise WriterError(f"encode_threads must be >= 1, got {encode_threads}")
        self.encode_threads = int(encode_threads or default_encode_threads())
        try:
            self.nice = check_nice(nice)
        except ValueError as exc:
            raise WriterError(str(exc)) from None
        self.on_progress = on_progress
        self._last_progress = 0.0
        self.path = Path(path)
        self.run = dict(run or {})
        self.mode: WriteMode = mode
        preflight(self.path, mode)  # path problems surface now, before any simulation runs
        self._state = _State()
        self._state.stats.queue_size = max_queue
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_queue)
        self._closed = False
        self._thread: threading.Thread | None = None
        self.spec: StoreSpec | None = None
        if spec is not None:
            self.start(spec)

    def start(self, spec: StoreSpec) -> None:
        """Create (or open for appending) the store for ``spec``; needed once before ``append``.

        A recorder calls this at the first inference, when the token layout is known. Calling it
        again with the same spec is a no-op; another spec is an error.
        """
        if self.spec is not None:
            if spec != self.spec:
                raise SchemaError(f"writer for {self.path} was started with another spec")
            return
        self._group = open_for_writing(self.path, spec, self.run, self.mode)
        self.spec = spec
        self._arrays = {name: arr.with_config(ARRAY_CONFIG) if ARRAY_CONFIG else arr
                        for name, arr in self._group.arrays()}
        self._snapshot = Snapshot(self.path)  # what readers see: rewritten after every commit
        self._rows = int(self._arrays[S.EPISODE].shape[0])
        self._episode_rows = int(self._arrays[S.EPISODE_INDEX].shape[0])
        self._next_rollout = _committed_counts(self._arrays[S.EPISODE][:]) if self._rows else Counter()
        BLOSC.acquire(self.encode_threads)
        self._thread = threading.Thread(target=self._run, name="attnstore-writer", daemon=True)
        self._thread.start()

    # ---- caller side -------------------------------------------------------------------------
    @property
    def stats(self) -> WriterStats:
        return self._state.stats

    @property
    def pending(self) -> int:
        """Items handed over and not yet fully written (queued or being written); their arrays are in use."""
        return self._queue.unfinished_tasks

    @property
    def queue_depth(self) -> int:
        """Items waiting in the queue now (not counting the one being written)."""
        return self._queue.qsize()

    def append(self, batch: InferenceBatch) -> None:
        """Queue one inference. Blocks only while the queue is full. Raises a previous thread error."""
        self._check_open()
        if self.spec is None:
            raise WriterError(f"writer for {self.path}: call start(spec) before append")
        validate_batch(batch, self.spec)
        self._put(batch)

    def end_episode(self, record: EpisodeRecord) -> None:
        """Queue the episode's table row (after all its inferences). Marks the episode complete."""
        self._check_open()
        if self.spec is None:
            raise WriterError(f"writer for {self.path}: call start(spec) before end_episode")
        self._put(record)

    def flush(self) -> None:
        """Wait until everything queued so far is on disk."""
        self._queue.join()
        self._raise_thread_error()

    def close(self, status: str = "closed", reason: str | None = None) -> WriterStats:
        """Flush, finish the store (status attr, and ``reason`` when given) and stop the thread.

        After a failure of the writer thread the store is finished as ``interrupted`` with the failure as
        its reason (the committed rows stay readable), then the failure is raised.
        """
        if self._closed:
            return self.stats
        self._closed = True
        if self._thread is None:  # never started: nothing was written
            return self.stats
        try:
            self._queue.put(_STOP)
            self._thread.join()
            BLOSC.release()
            if self._state.error is not None:
                status = "interrupted"
                reason = reason or _describe_failure(self._state.error, self.path, self.stats.rows)
            try:
                self._snapshot.finish(status, reason)
            finally:
                self._raise_thread_error()
        finally:
            release_lock(self.path)
        self.stats.store_bytes = directory_bytes(self.path)
        return self.stats

    def __enter__(self) -> AttentionWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close(status="interrupted")
        except WriterError:
            pass  # the original exception is the one to report

    def _check_open(self) -> None:
        if self._closed:
            raise WriterError(f"writer for {self.path} is closed")
        self._raise_thread_error()

    def _put(self, item: Any) -> None:
        stats = self.stats
        waited = False
        try:
            self._queue.put_nowait(item)
        except queue.Full:  # the writer is behind: the eval waits (back-pressure), nothing is dropped
            start = time.perf_counter()
            self._queue.put(item)
            stats.wait_seconds += time.perf_counter() - start
            stats.waits += 1
            waited = True
        stats.max_queue_depth = max(stats.max_queue_depth, self._queue.qsize())
        if self.on_progress is not None:
            now = time.monotonic()
            if waited or now - self._last_progress >= PROGRESS_INTERVAL_S:
                self._last_progress = now
                self.on_progress(stats)

    def _raise_thread_error(self) -> None:
        err = self._state.error
        if err is not None:
            raise WriterError(_describe_failure(err, self.path, self.stats.rows)) from err

    # ---- writer thread -----------------------------------------------------------------------
    def _run(self) -> None:
        if self.nice:
            yield_to_policy(self.nice)
            BLOSC.restart_pool()  # blosc's threads: started again by a niced zarr worker
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                if self._state.error is None:  # after a failure, drain without writing
                    start = time.perf_counter()
                    if isinstance(item, EpisodeRecord):
                        self._write_episode(item)
                    else:
                        self._write_batch(item)
                    self.stats.busy_seconds += time.perf_counter() - start
            except BaseException as exc:  # reported to the caller on its next call
                self._state.error = exc
            finally:
                self._queue.task_done()

    def _write_batch(self, batch: InferenceBatch) -> None:
        if batch.ready is not None:
            batch.ready()
        keep = np.ones(batch.batch_size, bool) if batch.keep is None else as_numpy(batch.keep).astype(bool)
        rows = np.flatnonzero(keep)
        if rows.size == 0:
            return
        n0, n = self._rows, self._rows + rows.size
        episodes = as_numpy(batch.episodes).astype(np.int64)[rows]
        env_steps = as_numpy(batch.env_steps).astype(np.int32)[rows]
        rollouts = np.empty(rows.size, np.int32)
        for i, ep in enumerate(episodes):
            rollouts[i] = self._next_rollout[int(ep)]
            self._next_rollout[int(ep)] += 1

        take = None if rows.size == batch.batch_size else rows  # every row kept: no copy
        data, prequantised = {}, set()
        for var in S.batch_variables(self.spec):
            value = batch[var.name]
            if var.attention_codec and is_uint16(value):  # quantised on the device (checked by validate_batch)
                data[var.name] = take_rows(as_numpy(value), take)
                prequantised.add(var.name)
            elif var.attention_codec:  # float: quantised below, in place, so always on a copy
                data[var.name] = as_numpy(value, var.numpy_dtype)[rows]
            else:
                data[var.name] = take_rows(as_numpy(value, var.numpy_dtype), take)
        attention_bytes = 4 * data[S.ATTENTION].size  # float32 bytes handed over, before encoding
        if self.spec.encoding in QUANTISED:  # checked before anything is resized: nothing half-written
            for var in S.batch_variables(self.spec):
                if var.attention_codec and var.name not in prequantised:  # (the device checked its own)
                    check_finite(var.name, data[var.name], episodes, env_steps)
            for var in S.batch_variables(self.spec):  # encoding: uint16 arrays get round(p * 65535)
                if var.attention_codec and self._arrays[var.name].dtype == np.uint16:
                    data[var.name] = quantise_attention(data[var.name], self.spec,
                                                        quantised=var.name in prequantised)
        data[S.ENV_STEP] = env_steps
        data[S.ROLLOUT] = rollouts
        if self.encode_threads > 1:  # few chunks: blosc's threads in each; many: one zarr pool thread per chunk
            BLOSC.intra(rows.size < self.encode_threads)
        self._append_rows(S.EPISODE, n0, data, episodes)
        self._rows = n
        self.stats.rows += rows.size
        self.stats.attention_bytes += attention_bytes

    def _write_episode(self, record: EpisodeRecord) -> None:
        i = self._episode_rows
        data = {
            var.name: np.asarray([getattr(record, var.name)], dtype=var.numpy_dtype)
            for var in S.stored_variables(self.spec, "episode")
            if var.name != S.EPISODE_INDEX
        }
        self._append_rows(S.EPISODE_INDEX, i, data, np.asarray([int(record.episode)], np.int64))
        self._episode_rows = i + 1
        self.stats.episodes += 1

    def _append_rows(self, marker: str, n0: int, data: Mapping[str, np.ndarray], marks: np.ndarray) -> None:
        """The commit protocol: grow every array, write the data, the commit marker, then the readers' snapshot.
        The resizes run concurrently on zarr's event loop, then the data writes (one round trip each instead
        of one per array: ~18 ms less per row of 13 arrays on 2 cores), and only then the marker."""
        n = n0 + len(marks)
        grown = [self._arrays[name] for name in (*data, marker)]
        together(arr.async_array.resize((n, *arr.shape[1:])) for arr in grown)
        together(self._arrays[name].async_array.setitem(slice(n0, n), values)  # data first ...
                 for name, values in data.items())
        self._arrays[marker][n0:n] = marks  # ... commit marker last
        self._snapshot.commit({name: self._arrays[name].shape for name in (*data, marker)})  # ... then show it


# ---- helpers -------------------------------------------------------------------------------------
def together(coroutines) -> None:
    """Run zarr coroutines concurrently on zarr's event loop and wait for all of them (the first error is
    raised once all have ended, so nothing is still writing when the caller goes on)."""
    import asyncio

    from zarr.core.sync import sync

    async def gather(coros):
        results = await asyncio.gather(*coros, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    sync(gather(list(coroutines)))


def _committed_counts(episodes: np.ndarray) -> Counter:
    return Counter(int(e) for e in episodes if e != S.UNCOMMITTED)


def _describe_failure(exc: BaseException, path: Path, rows: int) -> str:
    kept = f"the {rows} inferences committed before stay readable"
    if isinstance(exc, AttnStoreError):  # already one line that says what to do
        return f"{exc}; {kept}"
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return f"disk full while writing {path}: free space and re-run; {kept}"
    if isinstance(exc, OSError):
        return f"cannot write {path}: {exc.strerror or exc}; {kept}"
    return f"background writer failed on {path}: {type(exc).__name__}: {exc}; {kept}"
