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
from attnstore.schema.encoding import QUANTISED, canonical_encoding, quantise
from attnstore.store import codecs as _codecs  # noqa: F401 - registers the compact encoding's zarr codec
from attnstore.store.create import WriteMode, open_for_writing, preflight
from attnstore.store.lock import release_lock
from attnstore.store.snapshot import Snapshot



class InferenceBatch(Mapping):
    """One policy inference for B batch elements (each element is its own episode).

    A mapping from the schema's per-inference variable names (``attention``, ``key_valid``, ``images``,
    ``actions``, ``state``, ...; see :data:`attnstore.schema.VARIABLES`) to arrays with B rows, checked
    against the store's spec by the writer. Arrays may be numpy arrays or (CPU) torch tensors. Besides the
    variables: ``episodes`` (B,) and ``env_steps`` (B,) ints, ``times`` (D,) the flow-matching t actually
    used (checked against the spec), ``keep`` (B,) bool rows to store (None = all; finished envs are
    dropped) and ``ready``, called on the writer thread before reading (e.g. a CUDA event sync).

    >>> batch = InferenceBatch(episodes=[0], env_steps=[0], attention=np.zeros((1, 2)), key_valid=None)
    >>> sorted(batch), batch.batch_size, batch.images is None
    (['attention'], 1, True)
    """

    def __init__(self, episodes: Any, env_steps: Any, *, times: Any = None, keep: Any = None,
                 ready: Callable[[], None] | None = None, **variables: Any) -> None:
        unknown = sorted(set(variables) - set(S.VARIABLE))
        if unknown:
            raise SchemaError(f"InferenceBatch: unknown variables {unknown}; the schema has {sorted(S.VARIABLE)}")
        self.episodes, self.env_steps, self.times, self.keep, self.ready = episodes, env_steps, times, keep, ready
        self._data = {k: v for k, v in variables.items() if v is not None}

    def __getitem__(self, name: str) -> Any:
        return self._data[name]

    def __iter__(self):
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __getattr__(self, name: str) -> Any:  # batch.images: the variable, None when not given
        if name.startswith("_") or name not in S.VARIABLE:
            raise AttributeError(name)
        return self._data.get(name)

    def __setattr__(self, name: str, value: Any) -> None:  # batch.images = ...: sets the variable
        if name in S.VARIABLE:
            self[name] = value
        else:
            object.__setattr__(self, name, value)

    def __setitem__(self, name: str, value: Any) -> None:
        if name not in S.VARIABLE:
            raise SchemaError(f"InferenceBatch: unknown variable {name!r}; the schema has {sorted(S.VARIABLE)}")
        if value is None:
            self._data.pop(name, None)
        else:
            self._data[name] = value

    @property
    def batch_size(self) -> int:
        return len(self.episodes)


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
    ``bar.set_postfix(writer.stats.postfix(writer.queue_depth))``).
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
    ) -> None:
        if max_queue < 1:
            raise WriterError(f"max_queue must be >= 1, got {max_queue}")
        if encode_threads is not None and encode_threads < 1:
            raise WriterError(f"encode_threads must be >= 1, got {encode_threads}")
        self.encode_threads = int(encode_threads or default_encode_threads())
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
        _BLOSC.acquire(self.encode_threads)
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
        _validate_batch(batch, self.spec)
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
            _BLOSC.release()
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
        keep = np.ones(batch.batch_size, bool) if batch.keep is None else _np(batch.keep).astype(bool)
        rows = np.flatnonzero(keep)
        if rows.size == 0:
            return
        n0, n = self._rows, self._rows + rows.size
        episodes = _np(batch.episodes).astype(np.int64)[rows]
        env_steps = _np(batch.env_steps).astype(np.int32)[rows]
        rollouts = np.empty(rows.size, np.int32)
        for i, ep in enumerate(episodes):
            rollouts[i] = self._next_rollout[int(ep)]
            self._next_rollout[int(ep)] += 1

        take = None if rows.size == batch.batch_size else rows  # every row kept: no copy
        data, prequantised = {}, set()
        for var in S.batch_variables(self.spec):
            value = batch[var.name]
            if var.attention_codec and _is_uint16(value):  # quantised on the device (checked by _validate_batch)
                data[var.name] = _rows(_np(value), take)
                prequantised.add(var.name)
            elif var.attention_codec:  # float: quantised below, in place, so always on a copy
                data[var.name] = _np(value, var.numpy_dtype)[rows]
            else:
                data[var.name] = _rows(_np(value, var.numpy_dtype), take)
        attention_bytes = 4 * data[S.ATTENTION].size  # float32 bytes handed over, before encoding
        if self.spec.encoding in QUANTISED:  # checked before anything is resized: nothing half-written
            for var in S.batch_variables(self.spec):
                if var.attention_codec and var.name not in prequantised:  # (the device checked its own)
                    _check_finite(var.name, data[var.name], episodes, env_steps)
            for var in S.batch_variables(self.spec):  # encoding: uint16 arrays get round(p * 65535)
                if var.attention_codec and self._arrays[var.name].dtype == np.uint16:
                    data[var.name] = _quantise_attention(data[var.name], self.spec,
                                                         quantised=var.name in prequantised)
        data[S.ENV_STEP] = env_steps
        data[S.ROLLOUT] = rollouts
        if self.encode_threads > 1:  # few chunks: blosc's threads in each; many: one zarr pool thread per chunk
            _BLOSC.intra(rows.size < self.encode_threads)
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
        """The commit protocol: grow every array, write the data, the commit marker, then the readers' snapshot."""
        n = n0 + len(marks)
        for name in (*data, marker):
            arr = self._arrays[name]
            arr.resize((n, *arr.shape[1:]))
        for name, values in data.items():  # data first ...
            self._arrays[name][n0:n] = values
        self._arrays[marker][n0:n] = marks  # ... commit marker last
        self._snapshot.commit({name: self._arrays[name].shape for name in (*data, marker)})  # ... then show it


# ---- helpers -------------------------------------------------------------------------------------
def _validate_batch(batch: InferenceBatch, spec: StoreSpec) -> None:
    """Checks against the variable table on the caller's thread, so a mistake fails where it was made."""
    b = batch.batch_size
    if len(batch.env_steps) != b:
        raise SchemaError(f"InferenceBatch.env_steps: expected {b} values, got {len(batch.env_steps)}")
    if batch.keep is not None and len(batch.keep) != b:
        raise SchemaError(f"InferenceBatch.keep: expected {b} flags, got {len(batch.keep)}")
    if batch.times is not None:
        times = _np(batch.times, np.float64).reshape(-1)
        if times.shape != (len(spec.times),) or not np.allclose(times, spec.times, atol=1e-5):
            raise SchemaError(f"InferenceBatch.times {times.tolist()} differ from the store's {list(spec.times)}")
    wanted = S.batch_variables(spec)
    extra = sorted(set(batch) - {v.name for v in wanted})
    if extra:
        raise SchemaError(f"InferenceBatch carries {extra}, which this store's spec does not store")
    for var in wanted:
        if var.name not in batch:
            raise SchemaError(f"InferenceBatch.{var.name} is required by this store's spec")
        shape, got = (b, *var.row_shape(spec)), tuple(np.shape(batch[var.name]))
        if got != shape:
            raise SchemaError(f"InferenceBatch.{var.name}: expected shape {shape}, got {got}")
        if var.attention_codec and _is_uint16(batch[var.name]) and spec.encoding not in QUANTISED:
            raise SchemaError(
                f"InferenceBatch.{var.name} is already quantised (uint16), but this store keeps exact "
                f"{spec.encoding}: hand over the probabilities"
            )


_NUMPY_FLOATS = ("torch.float16", "torch.float32", "torch.float64")


def _np(value: Any, dtype: Any = None) -> np.ndarray:
    """numpy view of a numpy array or a CPU torch tensor (bf16/fp16 widened to float32)."""
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch here
        value = value.detach()
        if dtype is not None and np.dtype(dtype).kind == "f" and str(value.dtype) not in _NUMPY_FLOATS:
            value = value.float()  # bfloat16 (no numpy dtype): widened
        value = value.cpu().numpy()
    arr = np.asarray(value)
    return arr if dtype is None else arr.astype(dtype, copy=False)


def _is_uint16(value: Any) -> bool:
    """Whether ``value`` (numpy array or torch tensor) holds uint16: attention quantised on the device."""
    dtype = getattr(value, "dtype", None)
    return dtype is not None and str(dtype) in ("uint16", "torch.uint16")


def _rows(values: np.ndarray, take: np.ndarray | None) -> np.ndarray:
    return values if take is None else values[take]


def default_encode_threads() -> int:
    """Blosc threads per chunk by default: the cores this process may run on, at most 4."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


class _BloscThreads:
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


_BLOSC = _BloscThreads()


def _committed_counts(episodes: np.ndarray) -> Counter:
    return Counter(int(e) for e in episodes if e != S.UNCOMMITTED)


def _quantise_attention(values: np.ndarray, spec: StoreSpec, *, quantised: bool = False) -> np.ndarray:
    """uint16 round(p * 65535) of float32 rows the writer owns (overwritten), or ``values`` as they are when
    already ``quantised`` (uint16 from the device); ``analysis`` re-quantises each attention row within its
    checked bounds. (Version-1 stores, float32 arrays, are never passed.)"""
    stored = values if quantised else quantise(values)
    if canonical_encoding(spec.encoding) == "analysis":
        from attnstore.store.codecs import analysis_quantise

        stored = analysis_quantise(stored, spec.layout)
    return stored


def _check_finite(name: str, values: np.ndarray, episodes: np.ndarray, env_steps: np.ndarray) -> None:
    """uint16 has no NaN: refuse non-finite probabilities (an fp16 overflow) rather than store garbage."""
    bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise SchemaError(
            f"{name} of the inference at env step {env_steps[i]} of episode {episodes[i]} has non-finite values "
            f"(NaN/inf), which the uint16 encoding cannot store: run the policy in float32/bfloat16 instead of "
            f"float16, or capture with encoding float32 to keep them"
        )


def _describe_failure(exc: BaseException, path: Path, rows: int) -> str:
    kept = f"the {rows} inferences committed before stay readable"
    if isinstance(exc, AttnStoreError):  # already one line that says what to do
        return f"{exc}; {kept}"
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return f"disk full while writing {path}: free space and re-run; {kept}"
    if isinstance(exc, OSError):
        return f"cannot write {path}: {exc.strerror or exc}; {kept}"
    return f"background writer failed on {path}: {type(exc).__name__}: {exc}; {kept}"


def directory_bytes(path: Path) -> int:
    """Total size of the files under ``path`` (the store's size on disk)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
