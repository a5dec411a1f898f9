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
import json
import os
import queue
import shutil
import socket
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from attnstore import schema as S
from attnstore.errors import AttnStoreError, SchemaError, StoreError, WriterError
from attnstore.schema import EpisodeRecord, StoreSpec

WriteMode = Literal["create", "overwrite", "append"]


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

    >>> # doctest: +SKIP
    >>> with AttentionWriter("out/attention.zarr", spec, run={"task": "libero_object"}) as writer:
    ...     writer.append(InferenceBatch(episodes=[0], env_steps=[0], attention=probs, key_valid=valid))
    ...     writer.end_episode(EpisodeRecord(episode=0, success=True, num_env_steps=280))

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
        _preflight(self.path, mode)  # path problems surface now, before any simulation runs
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
        self._group = _open_for_writing(self.path, spec, self.run, self.mode)
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
            _finish_store(self.path, self._group, status)
        finally:
            _release_lock(self.path)
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


# ---- store creation ----------------------------------------------------------------------------
def _preflight(path: Path, mode: WriteMode) -> None:
    """Refuse a bad path/mode before anything runs (nothing is written here)."""
    if mode not in ("create", "overwrite", "append"):
        raise StoreError(f"unknown write mode '{mode}': use create, overwrite or append")
    exists = _non_empty(path)
    if mode == "append" and not exists:
        raise StoreError(f"cannot append: {path} does not exist (use mode 'create')")
    if mode == "create" and exists:
        raise StoreError(f"{path} already exists: choose a fresh output path, or overwrite it explicitly")
    if mode != "create" and exists:
        _open_existing(path)  # never append to or delete anything that is not an attnstore store
        _refuse_if_locked(path)  # nor one another writer is writing
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise StoreError(f"cannot write {path}: {parent} is not writable")


def _non_empty(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def _open_for_writing(path: Path, spec: StoreSpec, run: Mapping[str, Any] | None, mode: WriteMode):
    _preflight(path, mode)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _acquire_lock(path)  # before anything is touched (or deleted): one writer per store
    except OSError as exc:
        raise StoreError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        return _prepare_store(path, spec, run, mode)
    except BaseException:
        _release_lock(path)
        raise


def _prepare_store(path: Path, spec: StoreSpec, run: Mapping[str, Any] | None, mode: WriteMode):
    import zarr

    exists = _non_empty(path)
    if mode == "create" and exists:  # appeared since the preflight
        raise StoreError(f"{path} already exists: choose a fresh output path, or overwrite it explicitly")
    if mode == "append":
        group = _open_existing(path)
        stored, _ = S.read_root_attrs(group.attrs, str(path))
        if stored != spec:
            raise StoreError(
                f"cannot append to {path}: it was written with another capture spec "
                f"(layers {stored.layers}, denoise {stored.denoise_steps}, encoding {stored.encoding}); "
                f"write to a new store instead"
            )
        _drop_consolidated_metadata(path)
        group = zarr.open_group(str(path), mode="r+", use_consolidated=False)
        info = dict(group.attrs[S.ROOT_ATTR])
        info["status"] = "writing"
        group.attrs[S.ROOT_ATTR] = info
        return group
    if exists:  # mode == "overwrite", and _preflight checked it is an attnstore store
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        group = zarr.open_group(str(path), mode="w-", zarr_format=3)
        group.attrs.update(S.root_attrs(spec, run, status="writing"))
        _create_arrays(group, spec)
    except OSError as exc:
        raise StoreError(f"cannot create {path}: {exc.strerror or exc}") from exc
    return group


# ---- one writer per store ----------------------------------------------------------------------
# Two writers appending to one store would both write row n (and the shared index chunks): rows are
# lost without an error. A lock file beside the store (``attention.zarr.lock``; inside it, zarr would
# warn about a foreign object on every open) names the writing process; a lock whose process is
# gone (a killed run) is taken over, so a killed eval can be resumed with mode "append".
def lock_path(path: Path) -> Path:
    """The writer lock of the store at ``path``.

    >>> lock_path(Path("out/attention.zarr")).as_posix()
    'out/attention.zarr.lock'
    """
    return path.with_name(path.name + ".lock")


def _lock_owner(path: Path) -> dict[str, Any] | None:
    """Who holds the store's writer lock, or None when nobody does (no lock, or its process is gone)."""
    try:
        owner = json.loads(lock_path(path).read_text())
        pid = int(owner["pid"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return None  # empty or garbled: its writer died while creating it
    if owner.get("host") != socket.gethostname():
        return owner  # another machine's process cannot be checked from here: assume it runs
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, another user's
    return owner


def _locked_message(path: Path, owner: Mapping[str, Any]) -> str:
    return (
        f"{path} is being written by another writer (pid {owner.get('pid')} on {owner.get('host')}): "
        f"write each process to its own store, or wait for it to finish; if no writer runs, delete {lock_path(path)}"
    )


def _refuse_if_locked(path: Path) -> None:
    owner = _lock_owner(path)
    if owner is not None:
        raise StoreError(_locked_message(path, owner))


def _acquire_lock(path: Path) -> None:
    lock = lock_path(path)
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            _refuse_if_locked(path)
            lock.unlink(missing_ok=True)  # its writer is gone: take over
            continue
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname()}, f)
        return
    raise StoreError(f"cannot lock {path} for writing: another writer keeps taking it; run one writer per store")


def _release_lock(path: Path) -> None:
    lock = lock_path(path)
    try:
        if json.loads(lock.read_text()).get("pid") == os.getpid():
            lock.unlink()
    except (OSError, ValueError):
        pass


def _open_existing(path: Path):
    """Open an existing attnstore store or raise a one-line StoreError / SchemaError."""
    import zarr

    if not (path / "zarr.json").is_file():
        raise StoreError(f"{path} exists but is not a zarr v3 store (no zarr.json); refusing to touch it")
    try:
        group = zarr.open_group(str(path), mode="r", use_consolidated=False)
    except Exception as exc:
        raise StoreError(f"{path} is not a readable zarr group: {exc}") from exc
    S.read_root_attrs(group.attrs, str(path))
    return group


def _create_arrays(group, spec: StoreSpec) -> None:
    lay = spec.layout
    D, L, H, Q, K = spec.attention_shape_per_inference
    inference_coords = " ".join(S.INFERENCE_COORDS)

    def array(name, shape, dims, dtype, *, chunks=None, fill=0, coords="", codecs=None, attrs=None):
        kwargs = codecs if codecs is not None else {"compressors": S.default_compressors(np.dtype(dtype).itemsize if dtype is not str else 1)}
        arr = group.create_array(
            name,
            shape=shape,
            chunks=chunks or shape,
            dtype=dtype,
            fill_value=fill,
            dimension_names=list(dims),
            **kwargs,
        )
        merged = dict(attrs or {})
        if coords:
            merged["coordinates"] = coords
        if merged:
            arr.attrs.update(merged)
        return arr

    def static(name, dims, values, attrs=None):
        values = np.asarray(values)
        dtype = str if values.dtype.kind in "UO" else values.dtype
        arr = array(name, values.shape, dims, dtype, fill="" if dtype is str else 0, attrs=attrs)
        arr[...] = values
        return arr

    # static coordinates
    static(S.DENOISE, [S.DENOISE], np.asarray(spec.denoise_steps, np.int16))
    static(S.TIME, [S.DENOISE], np.asarray(spec.times, np.float32), {"long_name": "flow-matching time t"})
    static(S.LAYER, [S.LAYER], np.asarray(spec.layers, np.int16), {"long_name": "action-expert layer index"})
    static(S.HEAD, [S.HEAD], np.arange(H, dtype=np.int16))
    static(S.QUERY, [S.QUERY], np.arange(Q, dtype=np.int16), {"long_name": "action token"})
    for name, values in lay.key_coords().items():
        static(name, [S.KEY], values)

    key_coords = " ".join(S.KEY_COORDS)
    per_row = dict(coords=inference_coords)
    # index coordinates (small, many rows per chunk; the episode column is the commit marker)
    array(S.EPISODE, (0,), [S.INFERENCE], np.int64, chunks=(S.INDEX_CHUNK,), fill=S.UNCOMMITTED)
    array(S.ROLLOUT, (0,), [S.INFERENCE], np.int32, chunks=(S.INDEX_CHUNK,), fill=S.UNCOMMITTED)
    array(S.ENV_STEP, (0,), [S.INFERENCE], np.int32, chunks=(S.INDEX_CHUNK,), fill=S.UNCOMMITTED)
    array(
        S.ATTENTION,
        (0, D, L, H, Q, K),
        [S.INFERENCE, S.DENOISE, S.LAYER, S.HEAD, S.QUERY, S.KEY],
        np.float32,
        chunks=(1, D, L, H, Q, K),
        coords=f"{inference_coords} {S.TIME} {key_coords}",
        codecs=S.attention_codecs(spec.encoding),
        attrs={"long_name": "action-token attention probabilities", "encoding": spec.encoding},
    )
    array(S.KEY_VALID, (0, K), [S.INFERENCE, S.KEY], bool, chunks=(1, K), fill=False,
          coords=f"{inference_coords} {key_coords}")
    if spec.store_language_tokens and lay.num_language:
        N = lay.num_language
        static(S.LANGUAGE_TOKEN, [S.LANGUAGE_TOKEN], np.arange(N, dtype=np.int16))
        array(S.LANGUAGE_TOKEN_ID, (0, N), [S.INFERENCE, S.LANGUAGE_TOKEN], np.int32, chunks=(1, N),
              fill=S.LANGUAGE_PAD_ID, **per_row)
        array(S.LANGUAGE_TOKEN_TEXT, (0, N), [S.INFERENCE, S.LANGUAGE_TOKEN], str, chunks=(1, N),
              fill="", **per_row)
    if spec.image_shape is not None:
        cams = [c for c, present in zip(lay.cameras, lay.camera_present) if present]
        static(S.CAMERA, [S.CAMERA], np.asarray(cams, dtype=str))
        h, w, c = spec.image_shape
        array(S.IMAGES, (0, len(cams), h, w, c), [S.INFERENCE, S.CAMERA, S.HEIGHT, S.WIDTH, S.CHANNEL],
              np.uint8, chunks=(1, len(cams), h, w, c), **per_row,
              attrs={"long_name": "policy input images after lerobot's processors (upright, as the policy saw them)"})
    if spec.action_shape is not None:
        chunk, dim = spec.action_shape
        array(S.ACTIONS, (0, chunk, dim), [S.INFERENCE, S.ACTION_STEP, S.ACTION_DIM], np.float32,
              chunks=(1, chunk, dim), **per_row, attrs={"long_name": "predicted action chunk (policy output space)"})
    if spec.prefix_layers:
        PL, _, P, _ = spec.prefix_attention_shape_per_inference
        static(S.PREFIX_LAYER, [S.PREFIX_LAYER], np.asarray(spec.prefix_layers, np.int16))
        array(S.PREFIX_ATTENTION, (0, PL, H, P, P),
              [S.INFERENCE, S.PREFIX_LAYER, S.HEAD, S.PREFIX_QUERY, S.PREFIX_KEY], np.float32,
              chunks=(1, PL, H, P, P), codecs=S.attention_codecs(spec.encoding), **per_row,
              attrs={"long_name": "VLM prefix self-attention probabilities"})

    # per-episode table
    ep_chunks = (1024,)
    array(S.EPISODE_INDEX, (0,), [S.EPISODE_INDEX], np.int64, chunks=ep_chunks, fill=S.UNCOMMITTED)
    array(S.TASK_GROUP, (0,), [S.EPISODE_INDEX], str, chunks=ep_chunks, fill="")
    array(S.TASK_ID, (0,), [S.EPISODE_INDEX], np.int32, chunks=ep_chunks, fill=-1)
    array(S.TASK, (0,), [S.EPISODE_INDEX], str, chunks=ep_chunks, fill="")
    array(S.SUCCESS, (0,), [S.EPISODE_INDEX], bool, chunks=ep_chunks, fill=False)
    array(S.NUM_ENV_STEPS, (0,), [S.EPISODE_INDEX], np.int32, chunks=ep_chunks, fill=0)


def _finish_store(path: Path, group, status: str) -> None:
    import zarr

    info = dict(group.attrs[S.ROOT_ATTR])
    info["status"] = status
    group.attrs[S.ROOT_ATTR] = info
    with warnings.catch_warnings():  # "consolidated metadata is not in the v3 spec": xarray reads it
        warnings.simplefilter("ignore", category=UserWarning)
        zarr.consolidate_metadata(str(path))


def _drop_consolidated_metadata(path: Path) -> None:
    """Consolidated metadata goes stale once arrays grow; remove it while appending."""
    meta_path = path / "zarr.json"
    meta = json.loads(meta_path.read_text())
    if meta.pop("consolidated_metadata", None) is not None:
        tmp = meta_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, meta_path)


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
