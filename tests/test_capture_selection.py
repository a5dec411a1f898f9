"""Pure helpers of capture/: layer / denoise selection, layout helpers, tiny dims (no torch needed)."""

from __future__ import annotations

import numpy as np
import pytest

from attnstore.capture import layout, tiny
from attnstore.capture.selection import parse_denoise_steps, parse_layers
from attnstore.errors import CaptureError
from attnstore.schema import TokenLayout


@pytest.mark.parametrize(
    ("spec", "n", "want"),
    [
        ("last:2", 18, (16, 17)),
        ("last:1", 2, (1,)),
        ("all", 2, (0, 1)),
        ("-1,-2", 18, (16, 17)),
        (" 3, 1 ,3", 18, (1, 3)),
        ((17, 0), 18, (0, 17)),
        (-18, 18, (0,)),
    ],
)
def test_parse_layers(spec, n, want):
    assert parse_layers(spec, n) == want


@pytest.mark.parametrize("spec", ["last:0", "last:19", "last:x", "18", "-19", "", "a,b", [], True, "first"])
def test_parse_layers_rejects(spec):
    with pytest.raises(CaptureError) as info:
        parse_layers(spec, 18)
    assert "\n" not in str(info.value)


def test_parse_denoise_steps():
    assert parse_denoise_steps("final", 10) == (9,)
    assert parse_denoise_steps("all", 3) == (0, 1, 2)
    assert parse_denoise_steps([-1, 0], 10) == (0, 9)
    with pytest.raises(CaptureError, match="denoise step 10 is out of range"):
        parse_denoise_steps("10", 10)


def test_camera_slots_follow_present_first_order():
    keys = [f"observation.images.{c}" for c in ("a", "b", "c", "empty_camera_0")]
    got = layout.camera_slots(keys, {keys[1], keys[3]})
    assert got == (("b", "empty_camera_0", "a", "c"), (True, True, False, False))


def test_key_valid_matches_a_hand_built_mask():
    lay = TokenLayout(("image", "image2", "empty_camera_0"), (True, True, False))
    mask = np.zeros((2, 200), bool)
    mask[0, :41] = True
    mask[1, :7] = True
    valid = layout.key_valid(lay, mask)
    assert valid.shape == (2, 1018)
    for b, n in enumerate((41, 7)):
        want = np.r_[np.ones(512), np.zeros(256), np.ones(n), np.zeros(200 - n), np.ones(50)].astype(bool)
        np.testing.assert_array_equal(valid[b], want)
    with pytest.raises(CaptureError):
        layout.key_valid(lay, np.ones((1, 199), bool))


def test_tiny_dims_validation():
    with pytest.raises(CaptureError, match="patch_size"):
        tiny.TinyDims(image_size=225)
    assert tiny.TinyDims.from_dict(tiny.TinyDims(depth=3).to_dict()) == tiny.TinyDims(depth=3)
