"""The store's reading contract: plain ``xr.open_zarr`` and ``attnstore.open_attention`` on real stores.

Stores are written through the real AttentionWriter (tests/synthetic.py) with the real 10 denoise
steps and a shrunken key axis; the expected coordinates below are spelled out by hand, not taken
from attnstore.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import dask.array as da
import numpy as np
import pytest
import xarray as xr

from attnstore import schema as S
from attnstore.store.open import open_attention, read_spec, spec_of
from synthetic import make_spec, truth_index, write_synthetic_store

N_LANG, N_ACT, GRID = 6, 5, 4
N_VALID_LANGUAGE = 4
# keys: image 0-15 | image2 16-31 | empty_camera_0 32-47 (missing) | language 48-53 | action 54-58
N_KEYS = 3 * GRID * GRID + N_LANG + N_ACT
LAYERS = (16, 17)
TIMES = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]


def small_spec(**overrides):
    kwargs = dict(layers=LAYERS, num_language=N_LANG, num_action=N_ACT, grid=GRID, num_heads=2, image_size=8)
    kwargs.update(overrides)
    return make_spec(**kwargs)


def expected_key_coords() -> dict[str, list]:
    kind = ["image"] * 48 + ["language"] * N_LANG + ["action"] * N_ACT
    region = ["image"] * 16 + ["image2"] * 16 + ["empty_camera_0"] * 16 + ["language"] * N_LANG + ["action"] * N_ACT
    rows = [r for _ in range(3) for r in range(GRID) for _ in range(GRID)] + [-1] * (N_LANG + N_ACT)
    cols = [c for _ in range(3) for _ in range(GRID) for c in range(GRID)] + [-1] * (N_LANG + N_ACT)
    return {"key_kind": kind, "key_region": region, "patch_row": rows, "patch_col": cols}


def expected_key_valid() -> np.ndarray:
    valid = np.ones(N_KEYS, bool)
    valid[32:48] = False  # the missing camera
    valid[48 + N_VALID_LANGUAGE : 54] = False  # language padding
    return valid


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Two envs in lockstep (B=2): episodes 0 (5 inferences), 1 (3), then 2 (4) unfinished."""
    path = tmp_path_factory.mktemp("contract") / "attention.zarr"
    truth = write_synthetic_store(
        path, small_spec(), episodes={0: 5, 1: 3, 2: 4}, batch_size=2, seed=3,
        finish_episodes={0, 1}, n_valid_language=N_VALID_LANGUAGE,
    )
    return truth


def test_plain_xarray_reads_the_store_without_attnstore(store, tmp_path):
    """A reader with only xarray + zarr gets the decoded probabilities and the coordinates."""
    out = tmp_path / "read.npz"
    script = textwrap.dedent(
        f"""
        import sys, json
        import numpy as np, xarray as xr
        ds = xr.open_zarr({str(store["path"])!r})
        att = ds.attention
        np.savez({str(out)!r}, attention=att.values, episode=ds.episode.values, rollout=ds.rollout.values,
                 env_step=ds.env_step.values, time=ds.time.values, layer=ds.layer.values)
        print(json.dumps({{"dims": list(att.dims), "coords": sorted(att.coords),
                          "attnstore_imported": any(m.startswith("attnstore") for m in sys.modules)}}))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["attnstore_imported"] is False
    assert report["dims"] == ["inference", "denoise", "layer", "head", "query", "key"]
    for coord in ("episode", "rollout", "env_step", "time", "layer", "key_kind", "key_region", "patch_row",
                  "patch_col"):
        assert coord in report["coords"]
    got = np.load(out)
    assert got["episode"].tolist() == store["episode"].tolist()  # commit order, every row committed
    assert got["rollout"].tolist() == store["rollout"].tolist()
    assert got["env_step"].tolist() == store["env_step"].tolist()
    assert got["layer"].tolist() == list(LAYERS)
    np.testing.assert_allclose(got["time"], TIMES, atol=1e-6)
    err = np.abs(got["attention"].astype(np.float64) - store["attention"])
    assert err.max() <= S.MAX_ABS_ERROR["uint16"]


def test_open_attention_is_lazy_and_does_not_read_attention_at_open(store, tmp_path):
    import shutil

    path = tmp_path / "copy.zarr"
    shutil.copytree(store["path"], path)
    chunk_files = [f for f in (path / "attention" / "c").rglob("*") if f.is_file()]
    assert len(chunk_files) == len(store["rows"])  # one chunk per inference row
    for f in chunk_files:  # garbage: any read of an attention chunk now fails loudly
        f.write_bytes(b"not a blosc frame" * 8)
    ds = open_attention(path)
    assert isinstance(ds.attention.data, da.Array)
    assert ds.sizes["inference"] == len(store["rows"])
    one = ds.attention.sel(episode=1, rollout=2, denoise=0, layer=17)
    assert isinstance(one.data, da.Array)
    assert ds.key_valid.sel(episode=1, rollout=2).values.tolist() == expected_key_valid().tolist()
    with pytest.raises(Exception):
        one.values


def test_sel_by_episode_rollout_denoise_layer(store):
    ds = open_attention(store["path"])
    for ep, r in [(0, 0), (0, 4), (1, 2), (2, 3)]:
        for d, layer in [(0, 16), (9, 17), (4, 16)]:
            grid = ds.attention.sel(episode=ep, rollout=r, denoise=d, layer=layer)
            assert grid.dims == ("head", "query", "key")
            expected = store["attention"][truth_index(store, ep, r), d, LAYERS.index(layer)]
            assert np.abs(grid.values - expected).max() <= S.MAX_ABS_ERROR["uint16"]
            assert float(grid.time) == pytest.approx(TIMES[d])
            assert int(grid.env_step) == 10 * r


def test_coordinates_and_key_layout(store):
    ds = open_attention(store["path"])
    assert ds.attention.dims == ("inference", "denoise", "layer", "head", "query", "key")
    assert ds.layer.values.tolist() == list(LAYERS)
    assert ds.denoise.values.tolist() == list(range(10))
    np.testing.assert_allclose(ds.time.values, TIMES, atol=1e-6)
    # (ds["head"], not ds.head: Dataset.head and Dataset.query are methods)
    assert ds["head"].values.tolist() == [0, 1] and ds["query"].values.tolist() == list(range(N_ACT))
    for name, expected in expected_key_coords().items():
        assert ds[name].values.tolist() == expected, name
    # key_valid: False for the missing camera and language padding, on every row
    assert (ds.key_valid.values == expected_key_valid()[None]).all()
    # and the stored probabilities are exactly 0 there
    assert (ds.attention.values[..., ~expected_key_valid()] == 0).all()
    spec = spec_of(ds)
    assert spec == store["spec"] == read_spec(store["path"])[0]
    assert ds.attrs["attnstore_status"] == "closed"


def test_batched_ragged_round_trip(store):
    ds = open_attention(store["path"])
    assert ds.sizes["inference"] == 12
    for ep, n in {0: 5, 1: 3, 2: 4}.items():
        mine = ds.sel(episode=ep)
        assert sorted(mine.rollout.values.tolist()) == list(range(n))
        assert sorted(mine.env_step.values.tolist()) == [10 * r for r in range(n)]
    for ep, r in store["rows"]:
        i = truth_index(store, ep, r)
        row = ds.sel(episode=ep, rollout=r)
        assert np.abs(row.attention.values - store["attention"][i]).max() <= S.MAX_ABS_ERROR["uint16"]
        np.testing.assert_array_equal(row.images.values, store["images"][i])
        np.testing.assert_array_equal(row.actions.values, store["actions"][i])
        np.testing.assert_array_equal(row.language_token_id.values, store["language_token_id"][i])
        np.testing.assert_array_equal(row.language_token_text.values, store["language_token_text"][i])
    assert ds.camera.values.tolist() == ["image", "image2"]


def test_per_episode_table_has_finished_episodes_only(store):
    ds = open_attention(store["path"])
    # rows in the order episodes finished (episode 1 ends first in lockstep); episode 2 never finished
    assert ds.episode_index.values.tolist() == [1, 0]
    for ep in (0, 1):
        row, t = ds.sel(episode_index=ep).load(), store["episodes"][ep]
        assert row.task_group.item() == t["task_group"] and row.task.item() == t["task"]
        assert int(row.task_id) == t["task_id"] and int(row.num_env_steps) == t["num_env_steps"]
        assert bool(row.success) == t["success"]


def test_float32_store_is_exact(tmp_path):
    truth = write_synthetic_store(tmp_path / "f.zarr", small_spec(encoding="float32", images=False, actions=False),
                                  episodes={0: 2, 1: 1})
    for ds in (xr.open_zarr(tmp_path / "f.zarr"), open_attention(tmp_path / "f.zarr")):
        np.testing.assert_array_equal(ds.attention.values, truth["attention"])


def test_a_store_still_being_written_opens(tmp_path):
    """Unconsolidated, status 'writing' (what a running or killed eval leaves): both readers open it."""
    path = tmp_path / "w.zarr"
    truth = write_synthetic_store(path, small_spec(images=False, actions=False), episodes={0: 2, 5: 3},
                                  status="writing", finish_episodes={0})
    plain = xr.open_zarr(path, consolidated=False)
    assert plain.sizes["inference"] == 5
    ds = open_attention(path)
    assert ds.attrs["attnstore_status"] == "writing"
    assert ds.sizes["inference"] == 5 and ds.episode_index.values.tolist() == [0]
    assert np.abs(ds.attention.values - truth["attention"]).max() <= S.MAX_ABS_ERROR["uint16"]

