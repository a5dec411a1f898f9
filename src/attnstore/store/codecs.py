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
1/32 of the chunk (a chunk without denoise correlation, like ``tests/synthetic.py``'s i.i.d. noise, gets
order 0 with byte-shuffle: portable's own bytes, plus 4 header bytes).

Chunk bytes: ``b"AP"``, format version (1), order (0-2), then one blosc frame (its own header says the
shuffle). Readers: zarr-python (>= 3.1) once this module is imported (``attnstore.open_attention`` does;
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
_VERSION = 1
_HEADER = 4
_SAMPLE_STEP = 16  # every 16th key position feeds the per-chunk estimate
_SAMPLE_FRACTION = 32  # the shuffle (and order 0 or not) is chosen by compressing 1/32 of the chunk


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
    d = np.empty_like(x)
    d[0] = x[0]
    if x.shape[0] > 1:
        np.subtract(x[1:], x[:-1], out=d[1:])  # first differences, modulo 2**16
    if order == 2 and x.shape[0] > 2:
        d[2:] = d[2:] - d[1:-1]  # second differences: x[d] - 2 x[d-1] + x[d-2]
    s = d.view(np.int16)  # zigzag in place: 0, -1, 1, -2 ... -> 0, 1, 2, 3 ...
    sign = s >> 15
    s <<= 1
    s ^= sign
    z = s
    return np.moveaxis(z.view(np.uint16), 0, axis)


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
    contiguous 1/32 of the chunk. So a chunk without denoise correlation is never much larger than portable.
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


def encode_chunk(x: np.ndarray, axis: int = 1, clevel: int = 1) -> bytes:
    """Chunk bytes of uint16 ``x`` (header + blosc frame of the residuals)."""
    from numcodecs import Blosc

    x = np.asarray(x, np.uint16)
    order, shuffle = choose_encoding(x, axis, clevel)
    residuals = np.ascontiguousarray(x if order == 0 else predict(x, order, axis)).astype("<u2", copy=False)
    frame = Blosc(cname="zstd", clevel=clevel, shuffle=shuffle).encode(residuals)
    return _MAGIC + bytes((_VERSION, order)) + bytes(frame)


def decode_chunk(data: bytes | memoryview | np.ndarray, shape: tuple[int, ...], axis: int = 1) -> np.ndarray:
    """uint16 array of ``shape`` from :func:`encode_chunk`'s bytes; a damaged header is a ValueError."""
    from numcodecs import Blosc

    raw = memoryview(np.asarray(data, dtype=np.uint8) if isinstance(data, np.ndarray) else data).cast("B")
    if len(raw) < _HEADER or bytes(raw[:2]) != _MAGIC or raw[2] != _VERSION or raw[3] > 2:
        raise ValueError(f"{CODEC_NAME}: not a chunk of this codec (bad header)")
    order = int(raw[3])
    z = np.frombuffer(Blosc().decode(raw[_HEADER:]), dtype="<u2")
    if z.size != int(np.prod(shape)):
        raise ValueError(f"{CODEC_NAME}: chunk holds {z.size} values, expected {int(np.prod(shape))}")
    return unpredict(z.reshape(shape), order, axis).astype(np.uint16, copy=False)


@dataclass(frozen=True)
class DenoisePredictCodec(ArrayBytesCodec):
    """Zarr v3 array -> bytes codec ``attnstore.denoise_predict`` (uint16 only; lossless)."""

    is_fixed_size = False
    axis: int = 1
    clevel: int = 1

    def __init__(self, *, axis: int = 1, clevel: int = 1) -> None:
        object.__setattr__(self, "axis", int(axis))
        object.__setattr__(self, "clevel", int(clevel))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DenoisePredictCodec:
        _, config = parse_named_configuration(data, CODEC_NAME, require_configuration=False)
        return cls(**(config or {}))

    def to_dict(self) -> dict[str, Any]:
        return {"name": CODEC_NAME, "configuration": {"axis": self.axis, "clevel": self.clevel}}

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
        data = encode_chunk(chunk_array.as_numpy_array(), self.axis, self.clevel)
        return chunk_spec.prototype.buffer.from_bytes(data)

    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        return self._decode_sync(chunk_bytes, chunk_spec)

    async def _encode_single(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        return self._encode_sync(chunk_array, chunk_spec)

    def compute_encoded_size(self, input_byte_length: int, _chunk_spec: ArraySpec) -> int:
        raise NotImplementedError  # variable size


register_codec(CODEC_NAME, DenoisePredictCodec)


# ---- analysis grade: the writer's lossy re-quantisation (then stored with the codec above) -----------
ANALYSIS_STEPS = (8, 4, 2)  # residual steps tried per column, in units of 1/65535 (then exact)
_BOUND_MARGIN = 0.9  # the writer checks 90% of each stated bound (float32 readers differ by ~1e-7)


def analysis_quantise(u: np.ndarray, layout: Any, bounds: dict[str, float] | None = None) -> np.ndarray:
    """Lossy re-quantisation of uint16 attention rows (``u``: (B, D, ..., K), the writer's round(p * 65535))
    for the ``analysis`` encoding; returns new uint16 values, same shape.

    Along axis 1 (denoise) each value is coded closed-loop against the previous step's decoded value with
    a residual step of 8, 4 or 2 units, so the stored integers mostly repeat across denoise steps and
    :class:`DenoisePredictCodec` packs them tightly. Per attention row: each present camera's top-k
    patches (k = ``bounds["top_k"]``) keep their exact values and every other patch of that camera is
    capped below the k-th, so top-k patches (ties to the lower index) are identical; zeros stay 0 and
    nonzeros stay >= 1. Every column (one head/query/layer across its denoise steps) is then checked
    row by row against the bounds (``attnstore.schema.encoding.ANALYSIS_BOUNDS``: region shares, entropy,
    row sum, per-value error); a column that breaks one at step 8 tries 4, then 2, then is stored exactly.
    """
    from attnstore.schema.encoding import ANALYSIS_BOUNDS

    b = {**ANALYSIS_BOUNDS, **(bounds or {})}
    u = np.asarray(u, np.uint16)
    if u.ndim < 3:
        return u.copy()
    shape, K = u.shape, u.shape[-1]
    x = np.ascontiguousarray(np.moveaxis(u, 1, 0)).reshape(shape[1], -1, K).astype(np.int32)  # (D, C, K)
    regions, cameras = _row_regions(layout, K)
    flat = x.reshape(-1, K)
    protected = np.zeros(flat.shape, bool)
    cap = np.full(flat.shape, 65535, np.int32)
    k = int(b["top_k"])
    for a, z in cameras:
        if z - a < k:
            continue
        seg = flat[:, a:z]
        top = _top_k_positions(seg, k)
        np.put_along_axis(protected[:, a:z], top, True, axis=1)
        kth = top[:, -1:]
        value = np.take_along_axis(seg, kth, axis=1)
        cap[:, a:z] = np.where(np.arange(z - a)[None, :] < kth, value - 1, value).clip(0)
    protected, cap = protected.reshape(x.shape), cap.reshape(x.shape)
    D, C = x.shape[:2]
    reference = [r.reshape(D, C, *r.shape[1:]) for r in _row_stats(flat, regions)]
    out = x.copy()
    todo = np.arange(C)
    for step in ANALYSIS_STEPS:
        if todo.size == 0:
            break
        q = _closed_loop(x[:, todo], protected[:, todo], cap[:, todo], step)
        ref = [r[:, todo].reshape(-1, *r.shape[2:]) for r in reference]
        ok = _within_bounds(q.reshape(-1, K), ref, regions, b).reshape(D, -1).all(axis=0)
        out[:, todo[ok]] = q[:, ok]
        todo = todo[~ok]
    # columns left in `todo` stay exact (out was a copy of x)
    return np.moveaxis(out.reshape(shape[1], shape[0], *shape[2:]), 0, 1).astype(np.uint16)


def _closed_loop(x: np.ndarray, protected: np.ndarray, cap: np.ndarray, step: int) -> np.ndarray:
    """(D, C, K) int32: each denoise step coded as previous decoded + round(residual / step) * step."""
    q = np.empty_like(x)
    for d in range(x.shape[0]):
        if d == 0:
            v = np.rint(x[0] / step).astype(np.int32) * step
        else:
            v = q[d - 1] + np.rint((x[d] - q[d - 1]) / step).astype(np.int32) * step
        np.clip(v, 1, 65535, out=v)
        np.minimum(v, cap[d], out=v)
        v[protected[d]] = x[d][protected[d]]
        v[x[d] == 0] = 0
        q[d] = v
    return q


def _row_regions(layout: Any, n_keys: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(start, stop) of every key region, and of the present cameras, clipped to rows of ``n_keys``."""
    regions, cameras = [], []
    for name in layout.regions:
        s = layout.region_slice(name)
        a, z = min(s.start, n_keys), min(s.stop, n_keys)
        if z > a:
            regions.append((a, z))
            if name in layout.cameras and layout.camera_present[layout.cameras.index(name)]:
                cameras.append((a, z))
    return regions, cameras


def _top_k_positions(seg: np.ndarray, k: int) -> np.ndarray:
    """(rows, k) positions of the k largest values per row, rank order, ties to the lower index."""
    n = seg.shape[1]
    key = seg.astype(np.int64) * n + (n - 1 - np.arange(n))  # distinct; larger = ranks first
    part = np.argpartition(-key, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(key, part, axis=1), axis=1)
    return np.take_along_axis(part, order, axis=1)


def _row_stats(rows: np.ndarray, regions: list[tuple[int, int]]) -> list[np.ndarray]:
    """Per row: [sum, region shares (rows, n_regions), entropy (nats, over nonzero keys), values]."""
    total = rows.sum(axis=1, dtype=np.float64)
    safe = np.maximum(total, 1.0)
    shares = np.stack([rows[:, a:z].sum(axis=1, dtype=np.float64) / safe for a, z in regions], axis=1)
    p = rows / safe[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    return [total, shares, entropy, rows]


def _within_bounds(q: np.ndarray, reference: list[np.ndarray], regions: list[tuple[int, int]],
                   b: dict[str, float]) -> np.ndarray:
    """Rows of ``q`` whose sum, region shares, entropy and values are within the bounds of the reference."""
    total, shares, entropy, values = reference
    got_total, got_shares, got_entropy, _ = _row_stats(q, regions)
    m = _BOUND_MARGIN
    ok = np.abs(got_total - total) <= m * b["row_sum"] * np.maximum(total, 1.0)
    ok &= (np.abs(got_shares - shares) <= m * b["region_share"]).all(axis=1)
    ok &= np.abs(got_entropy - entropy) <= m * b["entropy"]
    ok &= (np.abs(q - values) <= m * b["value"] * 65535).all(axis=1)
    return ok
