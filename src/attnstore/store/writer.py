"""AttentionWriter: append inferences to a Zarr v3 attention store from a background thread.

The caller (the inference loop) hands over one :class:`InferenceBatch` per policy inference and goes
on; a single background thread encodes and writes it. The queue between them is bounded, so a slow
disk slows the caller down (back-pressure) instead of filling RAM.

Crash safety: every row is written data-first and its ``episode`` index last (the commit marker).
Each chunk is written whole (one chunk per inference row for the large arrays), and zarr's local
store replaces files by rename, so a killed process leaves every committed row readable and the
uncommitted ones invisible (their ``episode`` reads as the fill value -1).
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
from attnstore.store.create import WriteMode, finish_store, open_for_writing, preflight
from attnstore.store.lock import release_lock



@dataclass
class InferenceBatch:
    """One policy inference for B batch elements (each element is its own episode).

    Arrays may be numpy arrays or (CPU) torch tensors; shapes use the store's spec:
    D denoise steps, L layers, H heads, Q action tokens, K keys, N language tokens, C stored cameras.
    """

    episodes: Any  # (B,) int: the episode index of each batch element
    env_steps: Any  # (B,) int: env step (= video frame) at which the policy ran
    attention: Any  # (B, D, L, H, Q, K) float probabilities
    key_valid: Any  # (B, K) bool: False for padding / missing cameras
    times: Any = None  # (D,) the flow-matching t actually used; checked against the spec
    language_token_id: Any = None  # (B, N) int, -1 for padding
    language_token_text: Any = None  # (B, N) str, "" for padding
    images: Any = None  # (B, C, H, W, 3) uint8, what the policy saw
    actions: Any = None  # (B, chunk, action_dim) float predicted action chunk
    prefix_attention: Any = None  # (B, PL, H, P, P) float
    keep: Any = None  # (B,) bool: rows to store (finished envs are dropped); None = all
    ready: Callable[[], None] | None = None  # called on the writer thread before reading (e.g. CUDA event sync)

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

    @property
    def attention_mb_per_s(self) -> float:
        return self.attention_bytes / 1e6 / self.busy_seconds if self.busy_seconds else 0.0


_STOP = object()


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
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        spec: StoreSpec | None = None,
        *,
        run: Mapping[str, Any] | None = None,
        mode: WriteMode = "create",
        max_queue: int = 4,
    ) -> None:
        if max_queue < 1:
            raise WriterError(f"max_queue must be >= 1, got {max_queue}")
        self.path = Path(path)
        self.run = dict(run or {})
        self.mode: WriteMode = mode
        preflight(self.path, mode)  # path problems surface now, before any simulation runs
        self._state = _State()
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
        self._arrays = {name: arr for name, arr in self._group.arrays()}
        self._rows = int(self._arrays[S.EPISODE].shape[0])
        self._episode_rows = int(self._arrays[S.EPISODE_INDEX].shape[0])
        self._next_rollout = _committed_counts(self._arrays[S.EPISODE][:]) if self._rows else Counter()
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

    def close(self, status: str = "closed") -> WriterStats:
        """Flush, finish the store (consolidated metadata, status attr) and stop the thread."""
        if self._closed:
            return self.stats
        self._closed = True
        if self._thread is None:  # never started: nothing was written
            return self.stats
        try:
            self._queue.put(_STOP)
            self._thread.join()
            self._raise_thread_error()
            finish_store(self.path, self._group, status)
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
        self._queue.put(item)
        stats = self.stats
        stats.max_queue_depth = max(stats.max_queue_depth, self._queue.qsize())

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

        data: dict[str, np.ndarray] = {
            S.ATTENTION: _np(batch.attention, np.float32)[rows],
            S.KEY_VALID: _np(batch.key_valid).astype(bool)[rows],
        }
        optional = {
            S.LANGUAGE_TOKEN_ID: (batch.language_token_id, np.int32),
            S.LANGUAGE_TOKEN_TEXT: (batch.language_token_text, None),
            S.IMAGES: (batch.images, np.uint8),
            S.ACTIONS: (batch.actions, np.float32),
            S.PREFIX_ATTENTION: (batch.prefix_attention, np.float32),
        }
        for name, (value, dtype) in optional.items():
            if name in self._arrays:
                data[name] = _np(value, dtype)[rows]
        if self.spec.encoding == "uint16":  # checked before anything is resized: nothing half-written
            for name in (S.ATTENTION, S.PREFIX_ATTENTION):
                if name in data:
                    _check_finite(name, data[name], episodes, env_steps)
        data[S.ENV_STEP] = env_steps
        data[S.ROLLOUT] = rollouts

        for name in (*data, S.EPISODE):
            arr = self._arrays[name]
            arr.resize((n, *arr.shape[1:]))
        for name, values in data.items():  # data first ...
            self._arrays[name][n0:n] = values
        self._arrays[S.EPISODE][n0:n] = episodes  # ... commit marker last
        self._rows = n
        self.stats.rows += rows.size
        self.stats.attention_bytes += data[S.ATTENTION].nbytes

    def _write_episode(self, record: EpisodeRecord) -> None:
        i = self._episode_rows
        values = {
            S.TASK_GROUP: str(record.task_group),
            S.TASK_ID: int(record.task_id),
            S.TASK: str(record.task),
            S.SUCCESS: bool(record.success),
            S.NUM_ENV_STEPS: int(record.num_env_steps),
        }
        for name in (*values, S.EPISODE_INDEX):
            self._arrays[name].resize((i + 1,))
        for name, value in values.items():
            self._arrays[name][i] = value
        self._arrays[S.EPISODE_INDEX][i] = int(record.episode)  # commit marker last
        self._episode_rows = i + 1
        self.stats.episodes += 1


# ---- helpers -------------------------------------------------------------------------------------
def _validate_batch(batch: InferenceBatch, spec: StoreSpec) -> None:
    """Shape checks on the caller's thread, so a mistake fails where it was made."""
    b = batch.batch_size
    lay = spec.layout

    def check(name: str, value: Any, shape: tuple[int, ...]) -> None:
        got = tuple(value.shape)
        if got != shape:
            raise SchemaError(f"InferenceBatch.{name}: expected shape {shape}, got {got}")

    if len(batch.env_steps) != b:
        raise SchemaError(f"InferenceBatch.env_steps: expected {b} values, got {len(batch.env_steps)}")
    check("attention", batch.attention, (b, *spec.attention_shape_per_inference))
    check("key_valid", batch.key_valid, (b, lay.num_keys))
    if batch.times is not None:
        times = _np(batch.times, np.float64).reshape(-1)
        if times.shape != (len(spec.times),) or not np.allclose(times, spec.times, atol=1e-5):
            raise SchemaError(f"InferenceBatch.times {times.tolist()} differ from the store's {list(spec.times)}")
    n_cams = sum(lay.camera_present)
    wanted = {
        "images": (S.IMAGES, None if spec.image_shape is None else (b, n_cams, *spec.image_shape)),
        "actions": (S.ACTIONS, None if spec.action_shape is None else (b, *spec.action_shape)),
        "prefix_attention": (
            S.PREFIX_ATTENTION,
            (b, *spec.prefix_attention_shape_per_inference) if spec.prefix_layers else None,
        ),
    }
    if spec.store_language_tokens and lay.num_language:
        wanted["language_token_id"] = (S.LANGUAGE_TOKEN_ID, (b, lay.num_language))
        wanted["language_token_text"] = (S.LANGUAGE_TOKEN_TEXT, (b, lay.num_language))
    for attr, (_, shape) in wanted.items():
        value = getattr(batch, attr)
        if shape is None:
            continue
        if value is None:
            raise SchemaError(f"InferenceBatch.{attr} is required by this store's spec")
        check(attr, value, shape)
    if batch.keep is not None and len(batch.keep) != b:
        raise SchemaError(f"InferenceBatch.keep: expected {b} flags, got {len(batch.keep)}")


def _np(value: Any, dtype: Any = None) -> np.ndarray:
    """numpy view of a numpy array or a CPU torch tensor (bf16/fp16 widened to float32)."""
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch here
        value = value.detach()
        if dtype is np.float32 and value.is_floating_point():
            value = value.float()
        value = value.cpu().numpy()
    arr = np.asarray(value)
    return arr if dtype is None else arr.astype(dtype, copy=False)


def _committed_counts(episodes: np.ndarray) -> Counter:
    return Counter(int(e) for e in episodes if e != S.UNCOMMITTED)


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
