"""How arrays are encoded on disk: the attention encodings and the default compressor."""

from __future__ import annotations

from typing import Any, Literal

from attnstore.errors import SchemaError

Encoding = Literal["uint16", "float32"]
ENCODINGS: tuple[str, ...] = ("uint16", "float32")
UINT16_SCALE = 65535
# Worst-case absolute error of a stored probability, per encoding (round to nearest of 1/65535).
MAX_ABS_ERROR: dict[str, float] = {"uint16": 0.5 / UINT16_SCALE + 1e-7, "float32": 0.0}


def attention_codecs(encoding: str) -> dict[str, Any]:
    """Zarr v3 ``filters``/``compressors`` for the attention arrays.

    ``uint16``: p -> round(p * 65535) stored as uint16 (v3-spec ``scale_offset`` + ``cast_value``),
    blosc-zstd level 1 with 2-byte shuffle. Decodes to float32 for every reader; max abs error
    7.6e-6; exact zeros (masked keys) stay exactly 0. ``float32``: exact, blosc-zstd 4-byte shuffle.
    """
    from zarr.codecs import BloscCodec, CastValue, ScaleOffset

    if encoding == "uint16":
        return {
            "filters": [
                ScaleOffset(offset=0, scale=UINT16_SCALE),
                CastValue(data_type="uint16", rounding="nearest-even", out_of_range="clamp"),
            ],
            "compressors": [BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", typesize=2)],
        }
    if encoding == "float32":
        return {"compressors": [BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", typesize=4)]}
    raise SchemaError(f"unknown attention encoding '{encoding}'; choose one of {ENCODINGS}")


def default_compressors(typesize: int) -> list[Any]:
    """Compressor for the non-attention arrays (indices, images, actions)."""
    from zarr.codecs import BloscCodec

    return [BloscCodec(cname="zstd", clevel=3, shuffle="shuffle" if typesize > 1 else "noshuffle", typesize=typesize)]
