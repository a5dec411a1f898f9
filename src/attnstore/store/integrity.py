"""Chunk integrity on the read side: a damaged chunk is an error naming the array and the rows, never numbers.

:class:`CheckedStore` wraps the zarr Store that :meth:`attnstore.store.location.Location.store` hands out
for reading. Every chunk it returns has been checked first, before any codec sees it:

* a chunk ending with the ``crc32c`` codec (attention of schema 2) must match its checksum;
* a chunk ending with ``blosc`` and no checksum (schema-1 attention, the index columns, images) must have
  a consistent blosc header (sizes, block offsets) and must decompress: no codec is handed a frame it
  could crash on, and a decode error is caught here, where the chunk's key is known;
* a chunk that is absent is an error when it holds committed rows (the writer writes every chunk, fill
  values included): zarr would otherwise return fill values as if they were data.

Rows are committed when the ``episode`` (inference rows) or ``episode_index`` (episode table) marker is set;
:meth:`CheckedStore.arm` reads the markers. A chunk of only uncommitted rows (a killed run's tail) reads
as fill values, whatever state it is in. Failures raise :class:`attnstore.errors.StoreDamagedError`, which
passes through zarr and dask unchanged. :func:`chunk_problem` is the same check for ``inspect --verify``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from zarr.abc.store import RangeByteRequest, SuffixByteRequest
from zarr.storage import WrapperStore

from attnstore import schema as S
from attnstore.errors import StoreDamagedError

MARKERS = {S.INFERENCE: S.EPISODE, S.EPISODE_INDEX: S.EPISODE_INDEX}  # growing axis -> its commit marker
_BLOSC_HEADER = 16
_MEMCPYED = 0x2  # blosc flag: blocks stored uncompressed, no offsets table


# ---- pure checks -------------------------------------------------------------------------------
def blosc_problem(data: Any) -> str | None:
    """Why ``data`` is not a whole blosc (v1 format) frame, or None. Header only: nothing is decoded.

    >>> import numcodecs.blosc
    >>> frame = numcodecs.blosc.compress(np.arange(1000, dtype=np.int64).tobytes(), b"zstd", 1, 1)
    >>> blosc_problem(frame) is None
    True
    >>> blosc_problem(frame[:100]) == f"truncated blosc frame (header says {len(frame)} bytes, found 100)"
    True
    >>> blosc_problem(b"\\x02\\x01")
    'truncated blosc frame (2 bytes, shorter than its header)'
    """
    raw = _u8(data)
    if raw.size < _BLOSC_HEADER:
        return f"truncated blosc frame ({raw.size} bytes, shorter than its header)"
    version, flags = raw[0], raw[2]
    nbytes, blocksize, cbytes = (int.from_bytes(raw[i:i + 4], "little") for i in (4, 8, 12))
    if version not in (1, 2, 3, 4):
        return f"not a blosc frame (format version {version})"
    if cbytes != raw.size:
        return f"truncated blosc frame (header says {cbytes} bytes, found {raw.size})"
    if flags & _MEMCPYED:  # the data follows the header as is
        return None if cbytes == _BLOSC_HEADER + nbytes else f"garbled blosc header ({nbytes} bytes in {cbytes})"
    if nbytes == 0:
        return None
    if blocksize == 0:
        return f"garbled blosc header (block size 0 for {nbytes} bytes)"
    nblocks = math.ceil(nbytes / blocksize)
    first = _BLOSC_HEADER + 4 * nblocks
    if first > cbytes:
        return f"garbled blosc header ({nblocks} blocks do not fit in {cbytes} bytes)"
    starts = raw[_BLOSC_HEADER:first].view("<u4")
    if starts.size and (starts.min() < first or starts.max() >= cbytes):
        return "garbled blosc header (block offsets outside the frame)"
    return None


def crc32c_problem(data: Any) -> str | None:
    """Why ``data`` (bytes then their little-endian crc32c, the ``crc32c`` codec's layout) fails, or None.

    >>> import google_crc32c
    >>> body = b"attention"
    >>> crc32c_problem(body + google_crc32c.value(body).to_bytes(4, "little")) is None
    True
    >>> crc32c_problem(b"attentiom" + google_crc32c.value(body).to_bytes(4, "little"))
    'crc32c checksum mismatch'
    """
    import google_crc32c

    raw = _u8(data)
    if raw.size < 4:
        return f"truncated ({raw.size} bytes, shorter than its checksum)"
    if google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
        return "crc32c checksum mismatch"
    return None


def chunk_problem(data: Any, last_codec: str | None) -> str | None:
    """Why one stored chunk (or inner chunk) cannot be trusted, by the last codec of its chain, or None."""
    if last_codec == "crc32c":
        return crc32c_problem(data)
    if last_codec == "blosc":
        problem = blosc_problem(data)
        if problem is None:
            import numcodecs.blosc

            try:
                numcodecs.blosc.decompress(_u8(data))
            except RuntimeError as exc:
                return f"blosc frame does not decode ({exc})"
        return problem
    return None


# ---- one array's layout ------------------------------------------------------------------------
@dataclass(frozen=True)
class ArrayInfo:
    """What the checks need of one array's ``zarr.json``: dims, shape, stored-object grid, codecs."""

    name: str
    dims: tuple[str, ...]
    shape: tuple[int, ...]
    chunks: tuple[int, ...]  # rows etc. per stored object (the shard shape for sharded arrays)
    last_codec: str | None  # of the stored object (None: nothing to check)
    inner_last_codec: str | None = None  # sharded: of each inner chunk
    index_last_codec: str | None = None  # sharded: of the shard index
    inner_count: int = 0  # sharded: inner chunks per shard
    index_at_end: bool = True

    @classmethod
    def from_metadata(cls, name: str, meta: dict[str, Any]) -> ArrayInfo:
        codecs = meta.get("codecs") or []
        chunks = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        dims = tuple(meta.get("dimension_names") or ())
        shape = tuple(meta["shape"])
        if codecs and codecs[0].get("name") == "sharding_indexed":
            config = codecs[0]["configuration"]
            inner = tuple(config["chunk_shape"])
            return cls(name, dims, shape, chunks, None, _last(config.get("codecs")),
                       _last(config.get("index_codecs")),
                       math.prod(c // i for c, i in zip(chunks, inner)), config.get("index_location", "end") == "end")
        return cls(name, dims, shape, chunks, _last(codecs))

    @property
    def axis(self) -> str | None:
        """The growing axis of this array (inference or episode_index), None for fixed coordinates."""
        return self.dims[0] if self.dims and self.dims[0] in MARKERS else None

    def rows(self, coords: tuple[int, ...]) -> range:
        """Rows (on the first axis) of the stored object at ``coords``."""
        if not self.shape:
            return range(0, 1)
        start = coords[0] * self.chunks[0]
        return range(start, min(start + self.chunks[0], self.shape[0]))

    def shard_problem(self, data: Any) -> str | None:
        """A whole shard: its index's checksum, then each inner chunk it lists (none may be absent)."""
        raw = _u8(data)
        size = 16 * self.inner_count + (4 if self.index_last_codec == "crc32c" else 0)
        if raw.size < size:
            return f"truncated shard ({raw.size} bytes, shorter than its index)"
        index = raw[raw.size - size:] if self.index_at_end else raw[:size]
        problem = chunk_problem(index, self.index_last_codec)
        if problem:
            return f"shard index: {problem}"
        pairs = index[: 16 * self.inner_count].view("<u8").reshape(-1, 2)
        for n, (offset, length) in enumerate(pairs.tolist()):
            if offset == 2**64 - 1:
                return f"inner chunk {n} is absent"
            if offset + length > raw.size:
                return f"inner chunk {n} lies outside the shard"
            problem = chunk_problem(raw[offset:offset + length], self.inner_last_codec)
            if problem:
                return f"inner chunk {n}: {problem}"
        return None


def _u8(data: Any) -> np.ndarray:
    """Bytes, a memoryview or an array as a flat uint8 array (no copy)."""
    if isinstance(data, np.ndarray):
        return data.reshape(-1).view(np.uint8)
    return np.frombuffer(data, np.uint8)


def _last(codecs: Any) -> str | None:
    return codecs[-1].get("name") if codecs else None


def split_chunk_key(key: str) -> tuple[str, tuple[int, ...]] | None:
    """``(array, chunk coords)`` of a chunk key of the default v3 encoding, None for any other key.

    >>> split_chunk_key("attention/c/3/0/0/0/0/0"), split_chunk_key("episode/c.2"), split_chunk_key("a/zarr.json")
    (('attention', (3, 0, 0, 0, 0, 0)), ('episode', (2,)), None)
    """
    for sep in ("/", "."):
        name, found, rest = key.partition("/c" + sep)
        if found and name and all(p.isdigit() for p in rest.split(sep)):
            return name, tuple(int(p) for p in rest.split(sep))
    name, found, rest = key.rpartition("/c")
    return (name, ()) if found and name and not rest else None


# ---- which rows are committed ------------------------------------------------------------------
@dataclass
class RowIndex:
    """The commit markers (and rollouts) by absolute row, for deciding and naming."""

    episode: np.ndarray | None = None  # inference rows
    rollout: np.ndarray | None = None
    episode_index: np.ndarray | None = None  # episode table rows
    consolidated: bool = True
    # fixed coordinate arrays whose values all equal their fill value: zarr (before write_empty_chunks was
    # set for them) never wrote their chunk, so an absent chunk of these is not damage (None: not armed)
    fill_coords: frozenset[str] | None = None

    def committed(self, axis: str, rows: range) -> bool | None:
        """Whether any of ``rows`` is committed; None when the marker is not known (not armed)."""
        marker = self.episode if axis == S.INFERENCE else self.episode_index
        if marker is None:
            return None
        part = marker[rows.start:rows.stop]
        return bool((part != S.UNCOMMITTED).any())

    def describe(self, info: ArrayInfo, rows: range) -> str:
        """The rows of an object in words: ``row 4 (episode 1, rollout 0)``, ``rows 0-4095 (episodes 0-3)``."""
        if info.axis is None:
            return "a coordinate array, no row can be read"
        where = "episode table " if info.axis == S.EPISODE_INDEX else ""
        span = f"{where}row {rows.start}" if len(rows) == 1 else f"{where}rows {rows.start}-{rows.stop - 1}"
        marker = self.episode if info.axis == S.INFERENCE else self.episode_index
        if marker is None or info.name == MARKERS[info.axis]:
            return span
        eps = marker[rows.start:rows.stop]
        if len(rows) == 1 and eps.size == 1:
            if info.axis == S.INFERENCE and self.rollout is not None and rows.start < self.rollout.size:
                return f"{span} (episode {int(eps[0])}, rollout {int(self.rollout[rows.start])})"
            return f"{span} (episode {int(eps[0])})"
        committed = sorted({int(e) for e in eps if e != S.UNCOMMITTED})
        return f"{span} (episodes {_ranges(committed)})" if committed else span


def _ranges(values: list[int]) -> str:
    """Sorted ints as ranges.

    >>> _ranges([0, 1, 2, 5, 7, 8])
    '0-2, 5, 7-8'
    """
    out: list[str] = []
    for v in values:
        if out and int(out[-1].split("-")[-1]) == v - 1:
            out[-1] = f"{out[-1].split('-')[0]}-{v}"
        else:
            out.append(str(v))
    return ", ".join(out)


# ---- the store -------------------------------------------------------------------------------
class CheckedStore(WrapperStore):
    """A read-side zarr Store that checks every chunk before zarr decodes it (see the module docstring).

    ``name`` is the store as the user gave it (for messages). Reads only; writes pass through unchanged.
    """

    def __init__(self, store: Any, name: str = "", rows: RowIndex | None = None,
                 infos: dict[str, ArrayInfo] | None = None) -> None:
        super().__init__(store)
        self.name = name or str(store)
        self.rows = rows if rows is not None else RowIndex()
        self._infos: dict[str, ArrayInfo] = {} if infos is None else infos

    def _with_store(self, store: Any) -> CheckedStore:
        return type(self)(store, self.name, self.rows, self._infos)

    def arm(self, consolidated: bool = True) -> CheckedStore:
        """Read the commit markers (``episode``, ``rollout``, ``episode_index``) so that absent or damaged
        chunks can be told from a killed run's uncommitted tail. Call it outside zarr's event loop."""
        import zarr

        self.rows.consolidated = consolidated
        self.rows.fill_coords = self._fill_coords(zarr)
        for name in (S.EPISODE, S.EPISODE_INDEX, S.ROLLOUT):
            try:
                arr = zarr.open_array(store=self, path=name, mode="r", zarr_format=3)
                setattr(self.rows, name, np.asarray(arr[...]))
            except FileNotFoundError:  # no such array (zarr's NodeNotFoundError)
                continue
            except StoreDamagedError:  # left unknown: every row of its axis counts as committed
                continue
        return self

    def _fill_coords(self, zarr) -> frozenset[str]:
        """The coordinate arrays whose spec values equal their fill value everywhere (see RowIndex)."""
        try:
            spec, _ = S.read_root_attrs(zarr.open_group(store=self, mode="r", zarr_format=3).attrs, self.name)
        except Exception:  # not an attnstore store (yet): open_attention says so in its own words
            return frozenset()
        out = set()
        for var in S.stored_variables(spec):
            if var.role == "coord":
                values = np.asarray(var.values(spec))
                if values.size and bool(np.all(values == np.asarray(var.fill, dtype=values.dtype))):
                    out.add(var.name)
        return frozenset(out)

    def info(self, name: str, raw: bytes | None) -> ArrayInfo | None:
        """The layout of array ``name`` from its ``zarr.json`` bytes (cached; None: not an array)."""
        if name not in self._infos:
            if raw is None:
                return None
            meta = json.loads(raw)
            if meta.get("node_type") != "array":
                return None
            self._infos[name] = ArrayInfo.from_metadata(name, meta)
        return self._infos[name]

    def verdict(self, info: ArrayInfo, coords: tuple[int, ...], data: Any, byte_range: Any) -> str | None:
        """Why the object at ``coords`` cannot be used (``data`` None: it is absent), or None."""
        if data is None:
            return "absent"
        if info.inner_count:
            if isinstance(byte_range, SuffixByteRequest) or (isinstance(byte_range, RangeByteRequest)
                                                             and not info.index_at_end and byte_range.start == 0):
                problem = chunk_problem(data.as_numpy_array(), info.index_last_codec)
                return f"shard index: {problem}" if problem else None
            if byte_range is not None:
                return chunk_problem(data.as_numpy_array(), info.inner_last_codec)
            return info.shard_problem(data.as_numpy_array())
        if byte_range is not None:
            return None  # a partial read of a whole chunk: nothing to check it against
        return chunk_problem(data.as_numpy_array(), info.last_codec)

    def judge(self, key: str, data: Any, byte_range: Any, meta: bytes | None) -> Any:
        """``data`` when it may be used, None when it reads as fill values, else StoreDamagedError."""
        parsed = split_chunk_key(key)
        info = self.info(parsed[0], meta) if parsed else None
        if info is None or parsed is None:
            return data
        coords = parsed[1]
        problem = self.verdict(info, coords, data, byte_range)
        if problem is None:
            return data
        rows = info.rows(coords)
        if not self.matters(info, coords, rows):
            return None
        raise StoreDamagedError(damage_message(self.name, key, problem, self.rows.describe(info, rows)))

    def matters(self, info: ArrayInfo, coords: tuple[int, ...], rows: range) -> bool:
        """Whether a problem with this object is damage (it holds committed rows) or a killed run's tail."""
        if info.axis is None:  # a fixed coordinate: written at creation, absent only when all fill
            fill = self.rows.fill_coords
            return fill is not None and info.name not in fill
        if info.name == MARKERS[info.axis]:  # a marker's chunks are written at every commit
            last = coords[0] == (max(info.shape[0], 1) - 1) // info.chunks[0]
            return self.rows.consolidated or not last
        committed = self.rows.committed(info.axis, rows)
        return True if committed is None else committed

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        data = await self._store.get(key, prototype, byte_range)
        meta = None
        parsed = split_chunk_key(key)
        if parsed and parsed[0] not in self._infos:
            raw = await self._store.get(parsed[0] + "/zarr.json", prototype)
            meta = None if raw is None else raw.to_bytes()
        return self.judge(key, data, byte_range, meta)

    def get_sync(self, key: str, *, prototype: Any = None, byte_range: Any = None) -> Any:
        data = super().get_sync(key, prototype=prototype, byte_range=byte_range)
        meta = None
        parsed = split_chunk_key(key)
        if parsed and parsed[0] not in self._infos:
            raw = super().get_sync(parsed[0] + "/zarr.json", prototype=prototype)
            meta = None if raw is None else raw.to_bytes()
        return self.judge(key, data, byte_range, meta)

    async def get_partial_values(self, prototype: Any, key_ranges: Any) -> list[Any]:
        return [await self.get(key, prototype, byte_range) for key, byte_range in key_ranges]

    async def get_ranges(self, key: str, byte_ranges: Any, *, prototype: Any, **_: Any):
        """One fetch per range (no coalescing): each inner chunk is checked on its own."""
        for n, byte_range in enumerate(byte_ranges):
            yield [(n, await self.get(key, prototype, byte_range))]

    async def _get_many(self, requests: Any):
        for key, prototype, byte_range in requests:
            yield key, await self.get(key, prototype, byte_range)

    def __repr__(self) -> str:
        return f"CheckedStore({self._store!r})"


def damage_message(store: str, key: str, problem: str, rows: str) -> str:
    """The one line for a damaged object.

    >>> damage_message("run.zarr", "attention/c/1/0/0/0/0/0", "absent", "row 1 (episode 0, rollout 1)")
    "run.zarr: array 'attention', row 1 (episode 0, rollout 1): chunk attention/c/1/0/0/0/0/0 is damaged (absent); run 'attnstore inspect --verify run.zarr' to list every damaged row"
    """
    array = (split_chunk_key(key) or (key, ()))[0]
    return (f"{store}: array '{array}', {rows}: chunk {key} is damaged ({problem}); "
            f"run 'attnstore inspect --verify {store}' to list every damaged row")
