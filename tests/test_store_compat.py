"""A store written by an earlier attnstore (tests/fixtures/store_v1.zarr, see make_store_v1.py) keeps
opening, exporting and inspecting exactly as it did with the code that wrote it.

The expected inspect text and the exported ``.pt`` files were produced by that earlier code (commit
c751b6f) and are checked in beside the store; nothing here is produced by the code under test.
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
