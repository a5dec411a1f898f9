"""How arrays are encoded on disk: the attention encodings and the default compressor.

Attention encodings (``--attention.encoding``, ``import-pt --encoding``, ``StoreSpec.encoding``):

* ``portable`` (default): a plain uint16 array of round(p * 65535) with CF attributes ``scale_factor`` =
  1/65535, ``add_offset`` = 0 (no ``_FillValue``), blosc-zstd level 1 with 2-byte shuffle, then ``crc32c``.
  Every Zarr v3 reader decodes it with no extra package (zarr-python >= 3.1, tensorstore, zarrs); xarray's
  CF decoding gives float64 (``open_attention`` gives float32). Max abs error 7.6e-6; masked zeros stay 0.
* ``compact``: the same uint16 integers, exactly, through the ``attnstore.denoise_predict`` codec
  (:mod:`attnstore.store.codecs`: prediction along the denoise axis + blosc), then ``crc32c``. Readable
  by zarr-python with that codec registered (attnstore imported), not by tensorstore or zarrs.
* ``analysis``: ``compact``'s codec (with its value table, chunk format 2) on integers the writer first
  re-quantises (:func:`attnstore.store.analysis_grade.analysis_quantise`: a log grid with the rounding
  error carried along the keys, values kept across denoise steps where they can be; lossy, checked row by
  row against the bounds in :data:`ANALYSIS_BOUNDS`, a column that breaks one is coded finer or exactly).
* ``float32``: exact float32, blosc-zstd 4-byte shuffle, ``crc32c``.
* ``uint16``: the name of schema version 1's encoding (float32 array through the ``scale_offset`` +
  ``cast_value`` codecs, which need zarr-python >= 3.4 and ``cast-value-rs``). Version-1 stores keep
  reading; writing ``uint16`` now writes ``portable`` (an alias; the spec records ``uint16``).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from attnstore.errors import SchemaError

Encoding = Literal["portable", "compact", "analysis", "float32", "uint16"]
ENCODINGS: tuple[str, ...] = ("portable", "compact", "analysis", "float32", "uint16")
DEFAULT_ENCODING = "portable"
UINT16_SCALE = 65535
QUANTISED = frozenset({"portable", "compact", "analysis", "uint16"})  # stored as uint16 round(p * 65535)
# Worst-case absolute error of a stored probability, per encoding: round to nearest of 1/65535; analysis
# adds at most ANALYSIS_BOUNDS["value"] (checked per value by the writer; by construction <= 48 units, two
# gaps of its grid, 2 x attnstore.store.analysis_grade.LINEAR_STEP).
_ROUNDING = 0.5 / UINT16_SCALE + 1e-7
MAX_ABS_ERROR: dict[str, float] = {
    "portable": _ROUNDING, "compact": _ROUNDING, "uint16": _ROUNDING, "float32": 0.0,
    "analysis": 1e-3 + _ROUNDING,
}
# What the analysis grade guarantees for every attention row (checked by the writer row by row against
# the portable integers; a row that would break one is stored exactly): |region share error|, |entropy
# error| (nats, over the row's nonzero keys), |row sum - 1| (on top of portable's own rounding), the top-5
# patches per camera (identical, in order, ties to the lower index), |value error|; zeros stay exactly 0.
ANALYSIS_BOUNDS: dict[str, float] = {
    "region_share": 1e-3, "entropy": 0.01, "row_sum": 5e-3, "top_k": 5, "value": 1e-3,
}
# CF attributes of a quantised attention array: xarray (and any CF reader) decodes k -> k / 65535.
CF_ATTRS: dict[str, float] = {"scale_factor": 1.0 / UINT16_SCALE, "add_offset": 0.0}
DENOISE_PREDICT_CODEC = "attnstore.denoise_predict"  # implemented in attnstore.store.codecs
# blosc block size of the attention arrays: 1 MiB instead of blosc's automatic choice (small blocks at zstd
# level 1): 1.5-2.6x faster compression and 2-6% smaller (bench/bench_writer.py); any blosc reader decodes
# it (the frame says its block size), so stores written before stay the same format.
BLOSC_BLOCKSIZE = 1 << 20


def canonical_encoding(encoding: str) -> str:
    """What an encoding name writes: ``uint16`` writes ``portable``; others are themselves.

    >>> canonical_encoding("uint16"), canonical_encoding("compact")
    ('portable', 'compact')
    """
    if encoding not in ENCODINGS:
        raise SchemaError(f"unknown attention encoding '{encoding}'; choose one of {ENCODINGS}")
    return DEFAULT_ENCODING if encoding == "uint16" else encoding


def attention_codecs(encoding: str) -> dict[str, Any]:
    """Keyword arguments of ``zarr.Group.create_array`` for an attention array of this encoding.

    ``dtype`` (uint16 for the quantised encodings, float32 for ``float32``), the codec chain
    (``serializer``/``filters``/``compressors``, ending with ``crc32c``) and, for the quantised
    encodings, the CF ``attributes``. The writer quantises before writing (:func:`quantise`).
    """
    from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec

    encoding = canonical_encoding(encoding)
    if encoding == "float32":
        return {
            "dtype": np.float32,
            "filters": (),
            "serializer": BytesCodec(),
            "compressors": (
                BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", typesize=4, blocksize=BLOSC_BLOCKSIZE),
                Crc32cCodec(),
            ),
        }
    if encoding == "portable":
        serializer: Any = BytesCodec()
        compressors: tuple[Any, ...] = (
            BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", typesize=2, blocksize=BLOSC_BLOCKSIZE), Crc32cCodec()
        )
    else:  # compact, analysis: the codec of attnstore.store.codecs, by name (the writer registers it)
        config: dict[str, Any] = {"axis": 1, "clevel": 1}
        if encoding == "analysis":
            config["dictionary"] = True  # chunk format 2: the analysis grade's few distinct values as ranks
        serializer = {"name": DENOISE_PREDICT_CODEC, "configuration": config}
        compressors = (Crc32cCodec(),)
    return {
        "dtype": np.uint16,
        "filters": (),
        "serializer": serializer,
        "compressors": compressors,
        "attributes": dict(CF_ATTRS),
    }


def quantise(values: np.ndarray) -> np.ndarray:
    """float probabilities -> uint16 round(p * 65535), clipped to 0..65535 (vectorised, in place on a
    float32 ``values`` the caller owns: it is overwritten).

    >>> quantise(np.array([0.0, 0.5, 1.0, 1.0000001, -1e-9], np.float32)).tolist()
    [0, 32768, 65535, 65535, 0]
    """
    x = values if values.dtype == np.float32 and values.flags.writeable else values.astype(np.float32)
    np.multiply(x, np.float32(UINT16_SCALE), out=x)
    np.add(x, np.float32(0.5), out=x)  # + 0.5 then truncation = round half up
    np.clip(x, np.float32(0.0), np.float32(UINT16_SCALE), out=x)
    return x.astype(np.uint16)


def default_compressors(typesize: int) -> list[Any]:
    """Compressors for the non-attention arrays (indices, images, actions): blosc-zstd, then ``crc32c`` so
    that a damaged chunk is detected (store/integrity.py), never decoded into numbers."""
    from zarr.codecs import BloscCodec, Crc32cCodec

    shuffle = "shuffle" if typesize > 1 else "noshuffle"
    return [BloscCodec(cname="zstd", clevel=3, shuffle=shuffle, typesize=typesize), Crc32cCodec()]
