"""readers/ analyses against independent numpy computations, on stores written by the real writer.

The hand-built store: cameras ``image`` and ``wrist`` (2x2 patches each) plus a masked placeholder
slot ``empty``, 3 language tokens, 2 action tokens, 2 heads, expert layers (16, 17), denoise steps
(0, 9), VLM prefix layers (0, 1, 17). Key positions are spelled out below (not taken from the code
under test): image 0-3, wrist 4-7, empty 8-11, language 12-14, action 15-16.
"""

from __future__ import annotations

from contextlib import contextmanager

import dask
import numpy as np
import pytest
import xarray as xr

from attnstore import open_attention
from attnstore.errors import SelectionError
from attnstore.readers.analysis import (
    action_to_visual,
    aggregate,
    attention_rollout,
    entropy,
    region_shares,
    top_k_patches,
)
from attnstore.schema import MAX_ABS_ERROR, StoreSpec, TokenLayout
from attnstore.store.writer import AttentionWriter, InferenceBatch

IMAGE, WRIST, EMPTY, LANG, ACTION = slice(0, 4), slice(4, 8), slice(8, 12), slice(12, 15), slice(15, 17)
K, P = 17, 15
ROWS = [(0, 0), (1, 0), (0, 1)]  # (episode, rollout) in commit order
PREFIX_LAYERS = (0, 1, 17)


def _spec(prefix_layers=PREFIX_LAYERS) -> StoreSpec:
    layout = TokenLayout(("image", "wrist", "empty"), (True, True, False), grid_rows=2, grid_cols=2,
                         num_language=3, num_action=2)
    return StoreSpec(layout=layout, layers=(16, 17), num_layers=18, denoise_steps=(0, 9), num_heads=2,
                     encoding="float32", store_language_tokens=False, prefix_layers=prefix_layers)


def _truth(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    valid = np.ones((3, K), bool)
    valid[:, EMPTY] = False
    valid[1, 14] = False  # language padding in row 1 only
    att = rng.random((3, 2, 2, 2, 2, K)).astype(np.float32)
    att[0, ..., 3] = 0.0  # a valid key with zero attention (0 log 0)
    att *= valid[:, None, None, None, None, :]
    att /= att.sum(-1, keepdims=True)
    prefix = rng.random((3, len(PREFIX_LAYERS), 2, P, P)).astype(np.float32) ** 3
    prefix *= valid[:, None, None, None, :P]
    prefix /= prefix.sum(-1, keepdims=True)
    return {"attention": att, "key_valid": valid, "prefix": prefix}


def _write(path, spec: StoreSpec, truth: dict[str, np.ndarray]) -> None:
    extra = (lambda rows: {"prefix_attention": truth["prefix"][rows]}) if spec.prefix_layers else (lambda rows: {})
    with AttentionWriter(path, spec) as writer:
        for rows, episodes, steps in (([0, 1], [0, 1], [0, 0]), ([2], [0], [10])):
            writer.append(InferenceBatch(episodes=episodes, env_steps=steps, attention=truth["attention"][rows],
                                         key_valid=truth["key_valid"][rows], **extra(rows)))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    truth = _truth()
    path = tmp_path_factory.mktemp("analysis") / "attention.zarr"
    _write(path, _spec(), truth)
    return open_attention(path), truth


@contextmanager
def no_compute():
    """Fail if anything is computed inside the block (the analyses must only build dask graphs)."""

    def forbid(*args, **kwargs):
        raise AssertionError("an analysis computed eagerly")

    with dask.config.set(scheduler=forbid):
        yield


def _lazy(result: xr.DataArray) -> np.ndarray:
    assert dask.is_dask_collection(result.variable), "result is not dask-backed"
    return result.compute().values


# ---- aggregate -----------------------------------------------------------------------------------
def test_aggregate_reduces_and_selects_by_label(store):
    ds, truth = store
    att = truth["attention"]  # (inference, denoise, layer, head, query, key)
    with no_compute():
        mean = aggregate(ds.attention)
        picked = aggregate(ds, heads="max", queries=1, layers=17, denoise="mean")
        sliced = aggregate(ds.attention, heads=np.int16(0), queries=slice(0, 1), layers=np.array([16, 17]))
    np.testing.assert_allclose(_lazy(mean), att.mean(axis=(3, 4)), rtol=1e-6)
    np.testing.assert_allclose(_lazy(picked), att[:, :, 1].max(axis=2)[:, :, 1].mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(_lazy(sliced), att[:, :, :, 0].mean(axis=(2, 3)), rtol=1e-6)
    assert mean.dims == ("inference", "denoise", "layer", "key")
    # reducing a dim that is already gone is a no-op; selecting on it is an error
    np.testing.assert_allclose(_lazy(aggregate(ds.attention.sel(head=1))), att[:, :, :, 1].mean(axis=3), rtol=1e-6)
    with pytest.raises(SelectionError, match="no 'head' dim"):
        aggregate(ds.attention.sel(head=1), heads=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layers": 5}, r"layer 5 was not captured; this array has layer \[16, 17\]"),
        ({"layers": 1}, r"layer 1 was not captured"),  # a position is not a label
        ({"denoise": [0, 4]}, r"denoise \[4\] not captured; this array has denoise \[0, 9\]"),
        ({"heads": "median"}, r"heads='median': use one of \('mean', 'max'\)"),
        ({"queries": slice(5, 8)}, r"queries=slice\(5, 8, None\) selects nothing"),
        ({"heads": 0.5}, r"heads=0.5: use one of"),
    ],
)
def test_aggregate_bad_selection_is_one_line_error(store, kwargs, message):
    ds, _ = store
    with pytest.raises(SelectionError, match=message) as info:
        aggregate(ds.attention, **kwargs)
    assert "\n" not in str(info.value)


# ---- action_to_visual ----------------------------------------------------------------------------
def test_action_to_visual_matches_numpy(store):
    ds, truth = store
    agg = truth["attention"].mean(axis=(3, 4))  # (inference, denoise, layer, key)
    with no_compute():
        raw = action_to_visual(ds, "wrist")
        own = action_to_visual(ds, "wrist", renormalize=True)
        head1 = action_to_visual(ds.attention.sel(episode=0, rollout=1), "image", heads=1, queries=0)
    assert raw.dims == ("inference", "denoise", "layer", "patch_row", "patch_col")
    expected = agg[..., 4:8].reshape(3, 2, 2, 2, 2) / agg.sum(-1)[..., None, None]
    np.testing.assert_allclose(_lazy(raw), expected, rtol=1e-5)
    np.testing.assert_allclose(_lazy(own), expected / expected.sum(axis=(-2, -1), keepdims=True), rtol=1e-5)
    np.testing.assert_allclose(own.sum(("patch_row", "patch_col")).values, 1.0, rtol=1e-6)
    # row-major: patch (row 1, col 0) of the image is key 2
    row = truth["attention"][2, :, :, 1, 0]  # (denoise, layer, key) of episode 0 rollout 1
    np.testing.assert_allclose(_lazy(head1)[..., 1, 0], row[..., 2] / row.sum(-1), rtol=1e-5)
    assert head1.dims == ("denoise", "layer", "patch_row", "patch_col")
    # the camera's grid sums to its region share
    np.testing.assert_allclose(raw.sum(("patch_row", "patch_col")).values,
                               region_shares(ds).sel(region="wrist").values, rtol=1e-5)


def test_action_to_visual_camera_errors(store):
    ds, _ = store
    cameras = r"\['image', 'wrist'\]"
    with pytest.raises(SelectionError, match=r"camera 'front' is not in this store; its cameras are " + cameras):
        action_to_visual(ds, "front")
    with pytest.raises(SelectionError, match=r"camera 'empty' was not in the policy's input .* " + cameras):
        action_to_visual(ds, "empty")
    with pytest.raises(SelectionError, match="camera 'language' is not in this store"):
        action_to_visual(ds, "language")
    # a bare DataArray has no presence flags: the masked slot gives its (all-zero) grid
    np.testing.assert_array_equal(action_to_visual(ds.attention, "empty").values, 0.0)
    with pytest.raises(SelectionError, match="no 'key' dim"):
        action_to_visual(ds.attention.isel(key=0), "image")


# ---- region_shares -------------------------------------------------------------------------------
@pytest.mark.parametrize("heads", ["mean", "max"])
def test_region_shares_match_numpy_and_sum_to_one(store, heads):
    ds, truth = store
    att = truth["attention"]
    agg = (att.mean(axis=3) if heads == "mean" else att.max(axis=3)).mean(axis=3)
    with no_compute():
        shares = region_shares(ds, heads=heads)
    got = _lazy(shares)
    assert shares.dims == ("inference", "denoise", "layer", "region")
    assert shares.region.values.tolist() == ["image", "wrist", "empty", "language", "action"]
    expected = np.stack([agg[..., s].sum(-1) for s in (IMAGE, WRIST, EMPTY, LANG, ACTION)], -1)
    np.testing.assert_allclose(got, expected / expected.sum(-1, keepdims=True), rtol=1e-5)
    np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-6)
    assert np.all(got[..., 2] == 0.0)  # the masked slot


def test_region_shares_keep_heads_and_queries_when_asked(store):
    ds, truth = store
    shares = region_shares(ds.attention, heads=None, queries=None)
    assert shares.dims == ("inference", "denoise", "layer", "head", "query", "region")
    np.testing.assert_allclose(_lazy(shares)[..., 3], truth["attention"][..., LANG].sum(-1), rtol=1e-5)


# ---- entropy -------------------------------------------------------------------------------------
def _entropy(p: np.ndarray) -> np.ndarray:
    p = p / p.sum(-1, keepdims=True)
    logs = np.log(np.where(p > 0, p, 1.0))
    return -(p * logs).sum(-1)


def test_entropy_over_keys_matches_numpy(store):
    ds, truth = store
    att, valid = truth["attention"], truth["key_valid"]
    with no_compute():
        h = entropy(ds)
        hn = entropy(ds, normalize=True)
    assert h.dims == ("inference", "denoise", "layer", "head", "query")
    np.testing.assert_allclose(_lazy(h), _entropy(att), rtol=1e-5)
    n_valid = np.array([13, 12, 13])  # 17 keys - 4 masked ones (and a padded language token in row 1)
    assert (valid.sum(-1) == n_valid).all()
    np.testing.assert_allclose(_lazy(hn), _entropy(att) / np.log(n_valid)[:, None, None, None, None], rtol=1e-5)
    assert not np.isnan(h.values).any()  # row 0 has a valid key with zero attention: 0 log 0 = 0


def test_entropy_over_regions_matches_numpy(store):
    ds, truth = store
    att = truth["attention"]
    regions = np.stack([att[..., s].sum(-1) for s in (IMAGE, WRIST, EMPTY, LANG, ACTION)], -1)
    with no_compute():
        h = entropy(ds, over="region", normalize=True)
    np.testing.assert_allclose(_lazy(h), _entropy(regions) / np.log(4), rtol=1e-5)  # 4 regions hold valid keys


def test_entropy_hand_values_and_errors(store):
    ds, _ = store
    layout = TokenLayout(("cam",), (True,), grid_rows=1, grid_cols=2, num_language=1, num_action=1)
    coords = {k: ("key", v) for k, v in layout.key_coords().items()}
    da = xr.DataArray([[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]], dims=("query", "key"), coords=coords)
    valid = xr.DataArray([True, True, True, False], dims="key")
    np.testing.assert_allclose(entropy(da).values, [np.log(2), 0.0])
    np.testing.assert_allclose(entropy(da, normalize=True, key_valid=valid).values, [np.log(2) / np.log(3), 0.0])
    with pytest.raises(SelectionError, match=r"normalize=True\) needs the valid keys"):
        entropy(da, normalize=True)
    with pytest.raises(SelectionError, match=r"key_valid has dims \['inference'\] the attention array lacks"):
        entropy(ds.attention.isel(inference=0), key_valid=ds.key_valid)
    row = ds.attention.isel(inference=1)  # the row with a padded language token: 12 valid keys
    np.testing.assert_allclose(entropy(row, normalize=True, key_valid=ds.key_valid.isel(inference=1)).values,
                               entropy(ds, normalize=True).isel(inference=1).values, rtol=1e-6)
    with pytest.raises(SelectionError, match="over='heads': use 'keys' or 'region'"):
        entropy(ds, over="heads")


# ---- top_k_patches -------------------------------------------------------------------------------
def test_top_k_patches_match_numpy(store):
    ds, truth = store
    agg = truth["attention"].mean(axis=(3, 4))
    grid = agg[..., 0:4] / agg.sum(-1, keepdims=True)  # image, row-major 2x2
    with no_compute():
        top = top_k_patches(ds, "image", k=3)
    values = _lazy(top)
    assert top.dims == ("inference", "denoise", "layer", "rank")
    assert top["rank"].values.tolist() == [1, 2, 3]  # top.rank is DataArray.rank()
    order = np.argsort(-grid, axis=-1)[..., :3]
    np.testing.assert_allclose(values, np.take_along_axis(grid, order, -1), rtol=1e-5)
    np.testing.assert_array_equal(top.patch_row.values, order // 2)
    np.testing.assert_array_equal(top.patch_col.values, order % 2)
    assert (np.diff(values, axis=-1) <= 0).all()


def test_top_k_patches_bad_k(store):
    ds, _ = store
    for k in (0, 5, 2.0):
        with pytest.raises(SelectionError, match=r"use an int in 1\.\.4"):
            top_k_patches(ds, "image", k=k)


# ---- attention_rollout ---------------------------------------------------------------------------
def _rollout(prefix: np.ndarray, valid: np.ndarray, layer_positions, residual: float) -> np.ndarray:
    """Reference rollout for one inference: prefix (PL, H, P, P), valid (P,)."""
    out = np.eye(P)
    for pos in layer_positions:
        a = prefix[pos].mean(0) * valid[None, :]
        a_hat = residual * np.eye(P) + (1 - residual) * a
        a_hat /= a_hat.sum(-1, keepdims=True)
        out = a_hat @ out
    return out


@pytest.mark.parametrize("residual", [0.0, 0.5, 1.0])
def test_rollout_matches_numpy(store, residual):
    ds, truth = store
    with no_compute():
        r = attention_rollout(ds, residual=residual)
    got = _lazy(r)
    assert r.dims == ("inference", "prefix_query", "key")
    assert r.key_region.values.tolist()[4] == "wrist" and r.sizes["key"] == P
    for i in range(3):
        expected = _rollout(truth["prefix"][i], truth["key_valid"][i, :P], (0, 1, 2), residual)
        np.testing.assert_allclose(got[i], expected, rtol=1e-4, atol=1e-6)
    if residual == 1.0:
        np.testing.assert_allclose(got, np.broadcast_to(np.eye(P), got.shape), atol=1e-7)


def test_rollout_to_actions_matches_numpy(store):
    ds, truth = store
    with no_compute():
        rel = attention_rollout(ds, actions=True, heads="max")
    got = _lazy(rel)
    assert rel.dims == ("inference", "denoise", "query", "key")
    assert rel.attrs["prefix_layers"] == [0, 1] and rel.attrs["expert_layer"] == 17
    for i in range(3):
        valid = truth["key_valid"][i, :P]
        out = np.eye(P)
        for pos in (0, 1):  # prefix layers below expert layer 17, heads by max
            a_hat = 0.5 * np.eye(P) + 0.5 * truth["prefix"][i, pos].max(0) * valid[None, :]
            out = (a_hat / a_hat.sum(-1, keepdims=True)) @ out
        act = truth["attention"][i, :, 1].max(axis=1)[..., :P]  # (denoise, query, prefix keys), layer 17
        act = act / act.sum(-1, keepdims=True)
        np.testing.assert_allclose(got[i], act @ out, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-5)
    # the result feeds the camera tools: relevance of the wrist patches
    grid = action_to_visual(rel, "wrist").sel(denoise=9)
    np.testing.assert_allclose(grid.values[..., 0, 1], got[:, 1, :, 5].mean(-1), rtol=1e-5)


def test_rollout_errors(store, tmp_path):
    ds, truth = store
    captured = r"this store has prefix layers \[0, 1, 17\]"
    with pytest.raises(SelectionError, match=r"prefix layer\(s\) \[5\] not captured; " + captured):
        attention_rollout(ds, layers=[0, 5])
    with pytest.raises(SelectionError, match="expert layer 17 see the prefix through VLM layers < 17 only"):
        attention_rollout(ds, layers=[1, 17], actions=True)
    with pytest.raises(SelectionError, match=r"residual=1.5: use a number in \[0, 1\]"):
        attention_rollout(ds, residual=1.5)
    path = tmp_path / "no_prefix.zarr"
    _write(path, _spec(prefix_layers=()), truth)
    with pytest.raises(SelectionError, match=r"no prefix attention: re-run the evaluation with --attention\.prefix"):
        attention_rollout(open_attention(path))
    np.testing.assert_allclose(  # a single layer at residual 0 is that layer's head-mean attention
        attention_rollout(ds, layers=1, residual=0.0).values[1], truth["prefix"][1, 1].mean(0), rtol=1e-5
    )


# ---- realistic shapes (LIBERO Pi0.5 layout, uint16 encoding) ---------------------------------------
def test_real_layout_uint16_store(tmp_path):
    from synthetic import bump_patch, make_spec, write_synthetic_store

    spec = make_spec(denoise_steps=(9,), images=False, actions=False, num_action=50, num_heads=8)
    truth = write_synthetic_store(tmp_path / "attention.zarr", spec, episodes={0: 2, 1: 1})
    ds = open_attention(tmp_path / "attention.zarr")
    with no_compute():
        grid = action_to_visual(ds, "image2")
        top = top_k_patches(ds, "image2", k=1)
        shares = region_shares(ds)
    assert grid.shape == (3, 1, 2, 16, 16)
    agg = truth["attention"].astype(np.float64).mean(axis=(3, 4))
    expected = agg[..., 256:512].reshape(3, 1, 2, 16, 16) / agg.sum(-1)[..., None, None]
    np.testing.assert_allclose(_lazy(grid), expected, atol=1018 * MAX_ABS_ERROR["uint16"])
    np.testing.assert_allclose(_lazy(shares).sum(-1), 1.0, atol=1e-6)
    top = top.compute()
    for i, (episode, rollout) in enumerate(truth["rows"]):
        want = bump_patch(spec.layout, episode, int(truth["env_step"][i]), camera_slot=1)
        flat = expected[i].reshape(1, 2, 256)
        assert (top.patch_row.values[i, ..., 0] * 16 + top.patch_col.values[i, ..., 0] == flat.argmax(-1)).all()
        # the synthetic bump is broad and noisy: its mean-map peak is within one patch of its centre
        for layer in range(2):
            got = (top.patch_row.values[i, 0, layer, 0], top.patch_col.values[i, 0, layer, 0])
            assert max(abs(got[0] - want[0]), abs(got[1] - want[1])) <= 1, (episode, rollout, layer, got, want)


def test_package_names_are_the_analyses_not_their_modules():
    """``readers/aggregate.py`` shares its name with the function: the package must hand out the function,
    also after the submodule was imported explicitly (a fresh interpreter, so nothing is cached)."""
    import subprocess
    import sys

    code = ("import attnstore.readers.aggregate, attnstore.readers.regions\n"
            "from attnstore.readers import aggregate, entropy, region_shares\n"
            "assert callable(aggregate) and callable(entropy) and callable(region_shares), (aggregate, entropy)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
