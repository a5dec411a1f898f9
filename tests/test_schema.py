"""The schema module: layouts, specs and their attrs round trip, and version checks."""

from __future__ import annotations

import numpy as np
import pytest

from attnstore import schema as S
from attnstore.errors import SchemaError

def libero_layout() -> S.TokenLayout:
    return S.TokenLayout(cameras=("image", "image2", "empty_camera_0"), camera_present=(True, True, False))


def test_libero_layout_matches_the_legacy_key_axis():
    # The guide: 1018 = 768 (3 cameras x 256 patches) + 200 (language) + 50 (suffix).
    layout = libero_layout()
    coords = layout.key_coords()
    assert layout.num_keys == 3 * 256 + 200 + 50
    assert layout.prefix_len == 968
    kinds, counts = np.unique(coords[S.KEY_KIND], return_counts=True)
    assert dict(zip(kinds.tolist(), counts.tolist())) == {"image": 768, "language": 200, "action": 50}
    # patch (r, c) of camera i sits at i*256 + r*16 + c
    for cam_i, cam in enumerate(layout.cameras):
        for r, c in [(0, 0), (3, 7), (15, 15)]:
            k = cam_i * 256 + r * 16 + c
            assert (coords[S.KEY_REGION][k], coords[S.PATCH_ROW][k], coords[S.PATCH_COL][k]) == (cam, r, c)
    assert (coords[S.PATCH_ROW][768:] == S.NOT_A_PATCH).all()
    valid = layout.static_key_valid()
    assert not valid[512:768].any() and valid[:512].all() and valid[768:].all()


def test_spec_round_trips_through_attrs():
    spec = S.StoreSpec(
        layout=libero_layout(), layers=(16, 17), denoise_steps=(0, 9), num_layers=18,
        image_shape=(224, 224, 3), action_shape=(50, 7), prefix_layers=(17,),
    )
    attrs = S.root_attrs(spec, {"policy": "tiny"}, status="writing")
    back, info = S.read_root_attrs(attrs, "store")
    assert back == spec
    assert back.times == (1.0, pytest.approx(0.1))
    assert info["run"] == {"policy": "tiny"}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(layers=()), "at least one layer"),
        (dict(layers=(18,), num_layers=18), "out of range"),
        (dict(denoise_steps=(10,)), "denoise_steps must be in 0..9"),
        (dict(encoding="bf16"), "encoding must be one of"),
        (dict(image_shape=(224, 224)), "image_shape"),
    ],
)
def test_bad_specs_fail_with_a_clear_message(kwargs, message):
    base = dict(layout=libero_layout(), layers=(0,), denoise_steps=(0,))
    with pytest.raises(SchemaError, match=message):
        S.StoreSpec(**{**base, **kwargs})


def test_other_schema_version_and_foreign_attrs_are_refused():
    spec = S.StoreSpec(layout=libero_layout(), layers=(0,), denoise_steps=(0,))
    attrs = S.root_attrs(spec, None, "closed")
    attrs[S.ROOT_ATTR]["schema_version"] = S.SCHEMA_VERSION + 1
    with pytest.raises(SchemaError, match="schema version"):
        S.read_root_attrs(attrs, "x.zarr")
    with pytest.raises(SchemaError, match="not an attnstore attention store"):
        S.read_root_attrs({"something": 1}, "x.zarr")


def test_layout_rejects_inconsistent_cameras():
    with pytest.raises(SchemaError):
        S.TokenLayout(cameras=("a", "a"), camera_present=(True, True))
    with pytest.raises(SchemaError):
        S.TokenLayout(cameras=("a",), camera_present=(True, False))
    with pytest.raises(SchemaError):
        S.TokenLayout(cameras=("language",), camera_present=(True,))
