"""``attnstore.denoise_predict``: the lossless Zarr v3 codec of the ``compact`` (and ``analysis``) encodings.

An array -> bytes codec for uint16 chunks (attention as round(p * 65535)). Adjacent denoise steps of an
attention row are ~0.99 correlated, so each value is predicted from the same position at the previous
denoise step(s) along ``axis`` (1: the denoise axis of an ``(inference, denoise, ...)`` chunk):

* order 0: no prediction (the values themselves);
* order 1: ``x[d] - x[d-1]``;
* order 2: ``x[d] - (2 x[d-1] - x[d-2])`` (linear extrapolation; ``x[1] - x[0]`` at d = 1).

Residuals are taken modulo 2**16 and zigzag-mapped (small negative -> small odd), so the transform is
exactly invertible for every uint16 input, then blosc-zstd compresses them with bit- or byte-shuffle.
The encoder picks the order and the shuffle per chunk from a cheap estimate and a trial compression of
1/64 of the chunk (a chunk without denoise correlation, like ``tests/synthetic.py``'s i.i.d. noise, gets
order 0 with byte-shuffle: portable's own bytes, plus 4 header bytes).

Chunk bytes, format 1: ``b"AP"``, 1, order (0-2), then one blosc frame (its own header says the shuffle
and the block size). Format 2 (configuration ``dictionary: true``, the ``analysis`` encoding; used when a
chunk holds at most :data:`DICTIONARY_MAX` distinct values): ``b"AP"``, 2, order, the number n of distinct
values (uint32 LE), the n sorted values (uint16 LE), then the frame of the residuals of each value's rank.
Both formats decode whatever the configuration says (stores written with format 1 keep reading).

On tests/synthetic.py's maps (i.i.d. log-normal noise of sigma 0.3 on every element) no lossless coder
gets 2x under portable: the noise alone carries 2.01 bits per value (the entropy of the quantised noise
given the exact noise-free field), portable takes 3.29 (1 MiB blosc blocks), so 1.63x is the bound; this
codec gets 1.05x there (bench/bench_encoding.py; the bound: its --entropy).

Readers: zarr-python (>= 3.1) once this module is imported (``attnstore.open_attention`` does;
plain ``xr.open_zarr`` needs ``import attnstore.store.codecs`` or the ``zarr.codecs`` entry point), with
numcodecs for blosc. tensorstore and the zarrs pipeline do not know this codec. The module needs only
numpy, numcodecs and zarr, so it can be copied next to a reader that has no attnstore.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from zarr.abc.codec import ArrayBytesCodec
from zarr.core.common import parse_named_configuration
from zarr.registry import register_codec

if TYPE_CHECKING:
    from zarr.core.array_spec import ArraySpec
    from zarr.core.buffer import Buffer, NDBuffer

CODEC_NAME = "attnstore.denoise_predict"  # = attnstore.schema.encoding.DENOISE_PREDICT_CODEC
_MAGIC = b"AP"
_VERSION = 1  # chunk format 1: residuals of the values
_VERSION_DICTIONARY = 2  # chunk format 2: a table of the distinct values, then residuals of their ranks
DICTIONARY_MAX = 4096  # more distinct values than this: format 1 (ranks would not be much smaller)
BLOCKSIZE = 1 << 20  # blosc block bytes (1.5-1.8x faster than the automatic size, same sizes: bench_writer)
_HEADER = 4
_SAMPLE_STEP = 16  # every 16th key position feeds the per-chunk estimate
_SAMPLE_FRACTION = 64  # the shuffle (and order 0 or not) is chosen by compressing 1/64 of the chunk


def predict(x: np.ndarray, order: int, axis: int = 1) -> np.ndarray:
    """Zigzag residuals (uint16) of uint16 ``x`` predicted along ``axis`` with ``order`` 0, 1 or 2.

    >>> x = np.array([[100, 101, 103, 104]], np.uint16).T
    >>> predict(x, 1, axis=0).ravel().tolist(), predict(x, 2, axis=0).ravel().tolist()
    ([200, 2, 4, 2], [200, 2, 2, 1])
    >>> bool(np.array_equal(unpredict(predict(x, 2, axis=0), 2, axis=0), x))
    True
    """
    x = np.moveaxis(np.asarray(x, np.uint16), axis, 0)
    if order == 0:
        return np.moveaxis(x.copy(), 0, axis)
    with np.errstate(over="ignore"):  # modulo 2**16 on purpose
        return _predict(x, order, axis)


def _predict(x: np.ndarray, order: int, axis: int) -> np.ndarray:
    """Residuals of ``x`` (prediction axis first), one slice at a time so each pass stays in cache."""
    shape = x.shape
    x = x.reshape(shape[0], -1)  # (prediction axis, everything else)
    z = np.empty(x.shape, np.uint16)
    s = z.view(np.int16)
    sign = np.empty(x.shape[1:], np.int16)
    prev = None  # first differences of the previous slice (order 2)
    for t in range(x.shape[0]):
        if t == 0:
            z[0] = x[0]
        else:
            np.subtract(x[t], x[t - 1], out=z[t])  # first differences, modulo 2**16
            if order == 2:
                first = z[t].copy()
                if prev is not None:
                    z[t] -= prev  # second differences: x[t] - 2 x[t-1] + x[t-2]
                prev = first
        np.right_shift(s[t], 15, out=sign)  # zigzag in place: 0, -1, 1, -2 ... -> 0, 1, 2, 3 ...
        s[t] <<= 1
        s[t] ^= sign
    return np.moveaxis(z.reshape(shape), 0, axis)


def unpredict(z: np.ndarray, order: int, axis: int = 1) -> np.ndarray:
    """Inverse of :func:`predict` (exact for every uint16 input)."""
    z = np.moveaxis(np.asarray(z, np.uint16), axis, 0)
    if order == 0:
        return np.moveaxis(z.copy(), 0, axis)
    with np.errstate(over="ignore"):  # modulo 2**16 on purpose
        d = (z >> 1) ^ (np.uint16(0) - (z & 1))  # un-zigzag
        x = np.empty_like(d)
        x[0] = d[0]
        for t in range(1, d.shape[0]):
            if order == 2 and t >= 2:
                x[t] = d[t] + (x[t - 1] - x[t - 2]) + x[t - 1]
            else:
                x[t] = d[t] + x[t - 1]
    return np.moveaxis(x, 0, axis)


def choose_order(x: np.ndarray, axis: int = 1) -> tuple[int, float]:
    """The prediction order (1 or 2) whose residuals look smallest, and their estimated bits per value.

    The estimate is the mean of log2(1 + residual) on every 16th position of the last axis (cheap).
    """
    sample = np.ascontiguousarray(np.asarray(x, np.uint16)[..., ::_SAMPLE_STEP])
    if sample.ndim <= axis or sample.shape[axis] < 2:
        return 0, float("inf")
    best = (0, float("inf"))
    for order in (1, 2):
        if order == 2 and sample.shape[axis] < 3:
            break
        bits = float(np.log2(predict(sample, order, axis).astype(np.float32) + 1.0).mean())
        if bits < best[1]:
            best = (order, bits)
    return best


def choose_encoding(x: np.ndarray, axis: int = 1, clevel: int = 1) -> tuple[int, int]:
    """(order, blosc shuffle) for a chunk: the order from :func:`choose_order`, then the smallest of
    (order, bit-shuffle), (order, byte-shuffle) and (no prediction, byte-shuffle: portable's own) on a
    contiguous 1/64 of the chunk. So a chunk without denoise correlation is never much larger than portable.
    """
    from numcodecs import Blosc

    order, _ = choose_order(x, axis)
    if order == 0:
        return 0, Blosc.SHUFFLE
    flat = np.asarray(x, np.uint16).reshape(*x.shape[: axis + 1], -1)
    n = flat.shape[-1]
    sample = np.ascontiguousarray(flat[..., : max(min(n, 2048), n // _SAMPLE_FRACTION)])
    candidates = [(order, Blosc.BITSHUFFLE), (order, Blosc.SHUFFLE), (0, Blosc.SHUFFLE)]
    sizes = [len(Blosc(cname="zstd", clevel=clevel, shuffle=sh).encode(predict(sample, o, axis) if o else sample))
             for o, sh in candidates]
    return candidates[int(np.argmin(sizes))]


def encode_chunk(x: np.ndarray, axis: int = 1, clevel: int = 1, dictionary: bool = False) -> bytes:
    """Chunk bytes of uint16 ``x``: header + blosc frame of the residuals (format 1), or, with
    ``dictionary`` and at most :data:`DICTIONARY_MAX` distinct values, header + the sorted distinct values
    + the frame of the residuals of their ranks (format 2: few distinct values, e.g. the analysis grade's
    log grid, become small consecutive integers).

    >>> x = np.array([[[0, 700, 65535]], [[0, 700, 700]]], np.uint16)
    >>> [bytes(encode_chunk(x, dictionary=d)[:3]) for d in (False, True)]
    [b'AP\\x01', b'AP\\x02']
    >>> bool(np.array_equal(decode_chunk(encode_chunk(x, dictionary=True), x.shape), x))
    True
    """
    from numcodecs import Blosc

    x = np.asarray(x, np.uint16)
    table = b""
    version = _VERSION
    if dictionary and x.size:
        present = np.bincount(x.ravel(), minlength=65536) > 0
        values = np.flatnonzero(present).astype("<u2")
        if len(values) <= DICTIONARY_MAX:
            ranks = np.cumsum(present, dtype=np.int64).astype(np.uint16) - np.uint16(1)
            x = ranks[x]
            version = _VERSION_DICTIONARY
            table = len(values).to_bytes(4, "little") + values.tobytes()
    order, shuffle = choose_encoding(x, axis, clevel)
    residuals = np.ascontiguousarray(x if order == 0 else predict(x, order, axis)).astype("<u2", copy=False)
    frame = Blosc(cname="zstd", clevel=clevel, shuffle=shuffle, blocksize=BLOCKSIZE).encode(residuals)
    return _MAGIC + bytes((version, order)) + table + bytes(frame)


def decode_chunk(data: bytes | memoryview | np.ndarray, shape: tuple[int, ...], axis: int = 1) -> np.ndarray:
    """uint16 array of ``shape`` from :func:`encode_chunk`'s bytes (format 1 or 2); a damaged header is a
    ValueError."""
    from numcodecs import Blosc

    raw = memoryview(np.asarray(data, dtype=np.uint8) if isinstance(data, np.ndarray) else data).cast("B")
    if len(raw) < _HEADER or bytes(raw[:2]) != _MAGIC or raw[2] not in (_VERSION, _VERSION_DICTIONARY) or raw[3] > 2:
        raise ValueError(f"{CODEC_NAME}: not a chunk of this codec (bad header)")
    order, start, values = int(raw[3]), _HEADER, None
    if raw[2] == _VERSION_DICTIONARY:
        n = int.from_bytes(raw[_HEADER : _HEADER + 4], "little")
        start = _HEADER + 4 + 2 * n
        if not 0 < n <= DICTIONARY_MAX or len(raw) < start:
            raise ValueError(f"{CODEC_NAME}: damaged value table")
        values = np.frombuffer(raw[_HEADER + 4 : start], dtype="<u2")
    z = np.frombuffer(Blosc().decode(raw[start:]), dtype="<u2")
    if z.size != int(np.prod(shape)):
        raise ValueError(f"{CODEC_NAME}: chunk holds {z.size} values, expected {int(np.prod(shape))}")
    x = unpredict(z.reshape(shape), order, axis).astype(np.uint16, copy=False)
    if values is None:
        return x
    if x.size and int(x.max()) >= len(values):
        raise ValueError(f"{CODEC_NAME}: rank beyond the value table")
    return values[x].astype(np.uint16)


@dataclass(frozen=True)
class DenoisePredictCodec(ArrayBytesCodec):
    """Zarr v3 array -> bytes codec ``attnstore.denoise_predict`` (uint16 only; lossless)."""

    is_fixed_size = False
    axis: int = 1
    clevel: int = 1
    dictionary: bool = False

    def __init__(self, *, axis: int = 1, clevel: int = 1, dictionary: bool = False) -> None:
        object.__setattr__(self, "axis", int(axis))
        object.__setattr__(self, "clevel", int(clevel))
        object.__setattr__(self, "dictionary", bool(dictionary))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DenoisePredictCodec:
        _, config = parse_named_configuration(data, CODEC_NAME, require_configuration=False)
        return cls(**(config or {}))

    def to_dict(self) -> dict[str, Any]:
        config: dict[str, Any] = {"axis": self.axis, "clevel": self.clevel}
        if self.dictionary:  # absent = False: the configuration of stores written before format 2
            config["dictionary"] = True
        return {"name": CODEC_NAME, "configuration": config}

    def validate(self, *, shape, dtype, chunk_grid) -> None:  # noqa: ANN001 - zarr's signature
        native = dtype.to_native_dtype() if hasattr(dtype, "to_native_dtype") else np.dtype(dtype)
        if np.dtype(native) != np.dtype(np.uint16):
            raise ValueError(f"{CODEC_NAME} encodes uint16 arrays only, got {native}")
        if not -len(shape) <= self.axis < len(shape):
            raise ValueError(f"{CODEC_NAME}: axis {self.axis} out of range for {len(shape)}-d arrays")

    def _decode_sync(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        x = decode_chunk(chunk_bytes.as_numpy_array(), tuple(chunk_spec.shape), self.axis)
        return chunk_spec.prototype.nd_buffer.from_ndarray_like(x)

    def _encode_sync(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        data = encode_chunk(chunk_array.as_numpy_array(), self.axis, self.clevel, self.dictionary)
        return chunk_spec.prototype.buffer.from_bytes(data)

    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        return self._decode_sync(chunk_bytes, chunk_spec)

    async def _encode_single(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        return self._encode_sync(chunk_array, chunk_spec)

    def compute_encoded_size(self, input_byte_length: int, _chunk_spec: ArraySpec) -> int:
        raise NotImplementedError  # variable size


register_codec(CODEC_NAME, DenoisePredictCodec)


_MOVED = ("analysis_quantise", "ANALYSIS_RATIOS", "ANALYSIS_STEPS")


def __getattr__(name: str) -> Any:
    """The analysis grade's names, moved to :mod:`attnstore.store.analysis_grade` (imported on first use,
    so this module alone still needs nothing of attnstore)."""
    if name in _MOVED:
        from attnstore.store import analysis_grade

        return getattr(analysis_grade, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
