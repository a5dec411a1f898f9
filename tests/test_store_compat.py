"""Stores written by earlier attnstore releases keep opening, exporting and inspecting exactly as they did
with the code that wrote them: tests/fixtures/store_v1.zarr (before the schema table, make_store_v1.py,
commit c751b6f) and store_v2_{portable,compact}.zarr (the first schema-2 release, make_store_v2.py, commit
dac573c: no per-layer summaries, no layer kinds).

The expected inspect texts, the exported ``.pt`` files and the v2 stores' ground truth were produced by that
earlier code and are checked in beside the stores; nothing here is produced by the code under test.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from attnstore import schema as S

FIXTURES = Path(__file__).parent / "fixtures"
V1 = FIXTURES / "store_v1.zarr"


@pytest.fixture
def v1(tmp_path) -> Path:
    copy = tmp_path / "store_v1.zarr"
    shutil.copytree(V1, copy)
    return copy


def test_v1_store_opens_with_its_rows_and_table(v1):
    from attnstore import open_attention

    ds = open_attention(v1)
    assert ds.sizes[S.INFERENCE] == 7
    assert sorted(set(ds[S.EPISODE].values.tolist())) == [0, 1, 2]
    assert sorted(ds[S.EPISODE_INDEX].values.tolist()) == [0, 1]  # episode 2 never finished
    att = ds[S.ATTENTION].values
    valid = ds[S.KEY_VALID].values
    assert att.shape == (7, 2, 2, 2, 4, 64)
    np.testing.assert_allclose(att.sum(-1), 1.0, atol=5e-4)
    assert (att * ~valid[:, None, None, None, None, :] == 0).all()
    for name in (S.IMAGES, S.ACTIONS, S.LANGUAGE_TOKEN_ID, S.PREFIX_ATTENTION):
        assert name in ds
    assert S.STATE not in ds  # not a variable of that format


def test_v1_store_inspects_as_before(v1):
    from attnstore.legacy.inspect_pt import inspect_path

    expected = (FIXTURES / "store_v1.inspect.txt").read_text().rstrip("\n")
    assert inspect_path(v1).replace(str(v1), "STORE") == expected


def test_v1_store_exports_as_before(v1, tmp_path):
    torch = pytest.importorskip("torch")
    from attnstore.legacy.export_pt import export_pt

    out = tmp_path / "export"
    files = export_pt(v1, out, progress=False)
    before = sorted(p.relative_to(FIXTURES / "store_v1_export") for p in (FIXTURES / "store_v1_export").rglob("*.pt"))
    assert sorted(p.relative_to(out) for p in files) == before
    for rel in before:
        old = torch.load(FIXTURES / "store_v1_export" / rel, weights_only=False)
        new = torch.load(out / rel, weights_only=False)
        _assert_superset(old, new, str(rel))


def _assert_superset(old, new, where: str) -> None:
    """Everything the old export wrote is in the new one, equal (new keys may be added)."""
    import torch

    if isinstance(old, dict):
        assert isinstance(new, dict), where
        for key, value in old.items():
            assert key in new, f"{where}: key {key!r} missing"
            _assert_superset(value, new[key], f"{where}[{key!r}]")
    elif isinstance(old, (list, tuple)):
        assert len(old) == len(new), where
        for i, (a, b) in enumerate(zip(old, new)):
            _assert_superset(a, b, f"{where}[{i}]")
    elif isinstance(old, torch.Tensor):
        assert old.dtype == new.dtype and old.shape == new.shape, where
        assert torch.equal(old, new), where
    else:
        assert old == new, f"{where}: {old!r} != {new!r}"


# ---- schema 2 as its first release wrote it (tests/fixtures/make_store_v2.py, commit dac573c) ---------------
V2_TRUTH = FIXTURES / "store_v2_truth.npz"


@pytest.fixture(params=["portable", "compact"])
def v2(request, tmp_path) -> tuple[Path, str]:
    copy = tmp_path / f"store_v2_{request.param}.zarr"
    shutil.copytree(FIXTURES / f"store_v2_{request.param}.zarr", copy)
    return copy, request.param


def test_v2_store_opens_with_what_its_writer_was_handed(v2):
    """Rows, values and the episode table against what the old writer was handed (saved by that code)."""
    from attnstore import open_attention

    path, encoding = v2
    truth = dict(np.load(V2_TRUTH))
    want = {name: truth[f"{encoding}_{name}"] for name in
            ("attention", "prefix_attention", "key_valid", "images", "actions", "episode", "rollout")}
    ds = open_attention(path)
    assert ds.attrs["attnstore_status"] == "interrupted"
    assert ds[S.EPISODE].values.tolist() == want["episode"].tolist()
    assert ds[S.ROLLOUT].values.tolist() == want["rollout"].tolist()
    assert sorted(ds[S.EPISODE_INDEX].values.tolist()) == [0, 1]  # episode 2 never finished
    assert np.abs(ds[S.ATTENTION].values - want["attention"]).max() <= S.MAX_ABS_ERROR["uint16"]
    assert np.abs(ds[S.PREFIX_ATTENTION].values - want["prefix_attention"]).max() <= S.MAX_ABS_ERROR["uint16"]
    np.testing.assert_array_equal(ds[S.KEY_VALID].values, want["key_valid"])
    np.testing.assert_array_equal(ds[S.IMAGES].values, want["images"])
    np.testing.assert_allclose(ds[S.ACTIONS].values, want["actions"], rtol=0, atol=0)


def test_v2_compact_decodes_to_the_same_values_as_portable():
    from attnstore import open_attention

    portable = open_attention(FIXTURES / "store_v2_portable.zarr")[S.ATTENTION].values
    compact = open_attention(FIXTURES / "store_v2_compact.zarr")[S.ATTENTION].values
    np.testing.assert_array_equal(compact, portable)  # one quantisation, two lossless codecs


def test_v2_store_has_no_summaries_and_says_so(v2):
    from attnstore import open_attention
    from attnstore.errors import SelectionError
    from attnstore.readers import region_shares

    ds = open_attention(v2[0])
    assert not any(name.startswith("summary") for name in ds.variables)
    shares = region_shares(ds)  # from the full attention: what that release could answer, it still does
    assert shares.sizes[S.INFERENCE] == 7
    with pytest.raises(SelectionError, match="no per-layer summaries"):
        region_shares(ds, source="summary")


def test_v2_store_inspects_as_before(tmp_path):
    from attnstore.legacy.inspect_pt import inspect_path

    path = tmp_path / "store_v2_portable.zarr"
    shutil.copytree(FIXTURES / "store_v2_portable.zarr", path)
    expected = (FIXTURES / "store_v2_portable.inspect.txt").read_text().rstrip("\n")
    assert inspect_path(path).replace(str(path), "STORE") == expected


def test_v2_store_exports_as_before(tmp_path):
    torch = pytest.importorskip("torch")
    from attnstore.legacy.export_pt import export_pt

    path = tmp_path / "store_v2_portable.zarr"
    shutil.copytree(FIXTURES / "store_v2_portable.zarr", path)
    files = export_pt(path, tmp_path / "export", progress=False)
    old_dir = FIXTURES / "store_v2_portable_export"
    before = sorted(p.relative_to(old_dir) for p in old_dir.rglob("*.pt"))
    assert sorted(p.relative_to(tmp_path / "export") for p in files) == before
    for rel in before:
        _assert_superset(torch.load(old_dir / rel, weights_only=False),
                         torch.load(tmp_path / "export" / rel, weights_only=False), str(rel))


def test_the_current_writer_appends_to_a_v2_store(v2):
    """A resumed evaluation writing into a store of that release: the old rows stay as they were, the new ones
    read back as handed over."""
    import sys

    from attnstore import open_attention

    sys.path.insert(0, str(FIXTURES))
    try:
        from make_store_v2 import spec_for
    finally:
        sys.path.remove(str(FIXTURES))
    import synthetic as syn

    path, encoding = v2
    before = open_attention(path)[S.ATTENTION].values
    new = syn.write_synthetic_store(path, spec_for(encoding), episodes={5: 2}, finish_episodes={5}, mode="append",
                                    n_valid_language=5, seed=1)
    ds = open_attention(path)
    assert ds.sizes[S.INFERENCE] == 9 and sorted(ds[S.EPISODE_INDEX].values.tolist()) == [0, 1, 5]
    np.testing.assert_array_equal(ds[S.ATTENTION].values[:7], before)
    assert np.abs(ds[S.ATTENTION].values[7:] - new["attention"]).max() <= S.MAX_ABS_ERROR["uint16"]
