"""MP4 writing with PyAV: h264 in yuv420p, as lerobot writes its evaluation videos.

Frames are streamed (any iterable of RGB arrays), so an episode's video never sits in memory whole.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path

import numpy as np

from attnstore.errors import StoreError

CODEC = "libx264"
PIX_FMT = "yuv420p"


def even_size(height: int, width: int) -> tuple[int, int]:
    """The largest even (height, width) not above the given one: yuv420p needs even sizes.

    >>> even_size(225, 448)
    (224, 448)
    """
    return height - height % 2, width - width % 2


def write_mp4(path: str | os.PathLike[str], frames: Iterable[np.ndarray], fps: float) -> int:
    """Encode RGB uint8 frames (H, W, 3), all the same size, into an h264 MP4. Returns the frame count.

    Odd sizes are cropped by one pixel (yuv420p). The file is written next to its final name and
    renamed at the end, so a failed run leaves no half-written video behind.
    """
    import av

    if not fps > 0:
        raise StoreError(f"video fps must be > 0, got {fps}")
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
    count = 0
    try:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = None
            for frame in frames:
                frame = np.asarray(frame)
                if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
                    raise StoreError(f"video frames must be uint8 (H, W, 3), got {frame.dtype} {frame.shape}")
                if stream is None:
                    first_shape = frame.shape[:2]
                    height, width = even_size(*first_shape)
                    stream = container.add_stream(CODEC, rate=Fraction(fps).limit_denominator(1000))
                    stream.width, stream.height, stream.pix_fmt = width, height, PIX_FMT
                elif frame.shape[:2] != first_shape:
                    raise StoreError(f"video frame {count} is {frame.shape[:2]}, the first was {first_shape}")
                av_frame = av.VideoFrame.from_ndarray(
                    np.ascontiguousarray(frame[: stream.height, : stream.width]), format="rgb24"
                )
                container.mux(stream.encode(av_frame))
                count += 1
            if stream is None:
                raise StoreError(f"no frames to write into {path}")
            container.mux(stream.encode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return count
