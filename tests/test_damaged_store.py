"""Damaged chunks (issue 14, point 2): real files damaged on disk, read by real subprocesses.

A chunk of a committed row that is deleted, truncated or has flipped bytes must be an error naming the
array and the row (episode, rollout), exit 2 and one line, from every command, never fill values or
garbage read as attention and never a traceback or a crash; ``attnstore inspect --verify`` lists the
damaged rows (exit 1). A killed run's uncommitted tail is not damage. The expected rows below come from
the writer's ground truth (``write_synthetic_store``), never from the code under test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from attnstore import schema as S
from synthetic import make_spec, synthetic_batch, write_synthetic_store

SMALL = dict(num_language=12, num_action=4, grid=4, num_heads=2, image_size=32, denoise_steps=(0, 9),
             layers=(17,))
EPISODES = {0: 3, 1: 2}
V1 = Path(__file__).parent / "fixtures" / "store_v1.zarr"


def attnstore(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, MPLBACKEND="Agg")
    return subprocess.run([str(Path(sys.executable).with_name("attnstore")), *args], capture_output=True, text=True,
                          timeout=300, env=env)


def damage(file: Path, how: str) -> None:
    """Delete, truncate to half, flip 8 bytes in the middle or garble the (blosc) header of one object."""
    if how == "delete":
        file.unlink()
        return
    data = bytearray(file.read_bytes())
    if how == "truncate":
        data = data[: len(data) // 2]
    elif how == "header":
        data[8:16] = bytes(b ^ 0x5A for b in data[8:16])  # blosc block size and compressed size
    else:
        mid = len(data) // 2
        data[mid:mid + 8] = bytes(b ^ 0xFF for b in data[mid:mid + 8])
    file.write_bytes(bytes(data))


def chunk_file(store: Path, array: str, row: int) -> Path:
    files = [p for p in (store / array / "c" / str(row)).rglob("*") if p.is_file()]
    assert len(files) == 1, files
    return files[0]


@pytest.fixture(scope="module")
def healthy(tmp_path_factory):
    path = tmp_path_factory.mktemp("damaged") / "attention.zarr"
    truth = write_synthetic_store(path, make_spec(encoding="portable", **SMALL), episodes=EPISODES)
    return truth


@pytest.fixture
def copy(healthy, tmp_path):
    out = tmp_path / "attention.zarr"
    shutil.copytree(healthy["path"], out)
    return out


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attnstore: error: "), proc.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("how", ["delete", "truncate", "flip"])
def test_every_command_names_the_damaged_row(healthy, copy, tmp_path, how):
    row = healthy["rows"].index((0, 1))  # episode 0, rollout 1
    damage(chunk_file(copy, S.ATTENTION, row), how)
    where = f"row {row} (episode 0, rollout 1)"
    assert_one_line_error(attnstore("export-pt", str(copy), str(tmp_path / "pt"), "--no-progress"),
                          "'attention'", where)
    assert not list((tmp_path / "pt").rglob("episode_00000_attention.pt"))  # nothing exported as data
    assert_one_line_error(attnstore("plot", str(copy), "--out", str(tmp_path / "plots")), "'attention'", where)
    assert_one_line_error(attnstore("overlay", str(copy), "--episode", "0", "--all", "--out", str(tmp_path / "ov"),
                                    "--no-progress"), "'attention'", where)

    verify = attnstore("inspect", "--verify", str(copy))
    assert verify.returncode == 1, verify.stderr
    assert f"attention: {where}:" in verify.stdout
    assert "damaged (episode, rollout): (0, 1)" in verify.stdout
    assert "damaged:      1 chunk(s), 1 committed inference row(s)" in verify.stdout


@pytest.mark.parametrize("how", ["delete", "truncate", "flip"])
def test_open_attention_raises_and_other_rows_still_read(healthy, copy, how):
    from attnstore import open_attention
    from attnstore.errors import StoreDamagedError

    row = healthy["rows"].index((1, 0))
    damage(chunk_file(copy, S.ATTENTION, row), how)
    ds = open_attention(copy)
    with pytest.raises(StoreDamagedError, match=r"'attention', row 3 \(episode 1, rollout 0\)"):
        ds.attention.values
    good = ds.attention.sel(episode=0, rollout=2).values  # an intact row reads as written
    np.testing.assert_allclose(good, healthy["attention"][healthy["rows"].index((0, 2))], atol=1e-4)


def test_index_column_and_image_damage_are_named(healthy, copy, tmp_path):
    from attnstore import open_attention
    from attnstore.errors import StoreDamagedError

    damage(chunk_file(copy, S.IMAGES, 4), "truncate")  # images: blosc + crc32c (schema 2), no attention codec
    with pytest.raises(StoreDamagedError, match=r"'images', row 4 \(episode 1, rollout 1\).*crc32c checksum mismatch"):
        open_attention(copy).images.values
    (copy / S.EPISODE / "c" / "0").unlink()  # the commit marker: not a killed run, a damaged store
    proc = attnstore("export-pt", str(copy), str(tmp_path / "pt"), "--no-progress")
    assert_one_line_error(proc, "'episode'", "rows 0-4")


@pytest.mark.parametrize("array", [S.IMAGES, S.ACTIONS, S.ENV_STEP])
def test_flipped_bytes_in_any_per_inference_array_are_detected(healthy, copy, array):
    """Every array ends with crc32c (schema 2): flipped bytes in images, actions or an index column are
    named, never decoded into numbers."""
    damage(chunk_file(copy, array, 0) if array != S.ENV_STEP else next((copy / array / "c").rglob("0")), "flip")
    proc = attnstore("inspect", "--verify", str(copy))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"    {array}: row" in proc.stdout and "crc32c checksum mismatch" in proc.stdout, proc.stdout


def test_healthy_store_verifies_clean(healthy):
    proc = attnstore("inspect", "--verify", str(healthy["path"]))
    assert proc.returncode == 0, proc.stderr
    assert "damaged:      none" in proc.stdout
    n_objects = sum(1 for p in healthy["path"].rglob("c/*") if p.is_file()) + sum(
        1 for p in healthy["path"].rglob("*") if p.is_file() and p.parent.name != "c" and p.name != "zarr.json"
        and "/c/" in p.as_posix())
    assert f"checked:      {n_objects} chunks" in proc.stdout


def test_uncommitted_tail_is_not_damage(healthy, copy):
    """Row 4's commit marker unset (a run killed before it): its chunk may be absent or half written."""
    import zarr

    from attnstore import open_attention

    marker = zarr.open_array(str(copy / S.EPISODE), mode="r+")
    marker[4] = S.UNCOMMITTED
    (copy / S.ATTENTION / "c" / "4").rename(copy / "gone")  # absent
    damage(chunk_file(copy, S.IMAGES, 4), "truncate")  # half written
    ds = open_attention(copy)
    assert ds.sizes[S.INFERENCE] == 4
    np.testing.assert_allclose(ds.attention.values, healthy["attention"][:4], atol=1e-4)
    proc = attnstore("inspect", "--verify", str(copy))
    assert proc.returncode == 0 and "damaged:      none" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize("how", ["delete", "truncate", "header"])
def test_schema_v1_store_without_checksums(tmp_path, how):
    """Schema-1 attention has no crc32c: the blosc frame is checked and trial-decoded before zarr sees it."""
    from attnstore import open_attention
    from attnstore.errors import StoreDamagedError

    store = tmp_path / "store_v1.zarr"
    shutil.copytree(V1, store)
    damage(chunk_file(store, S.ATTENTION, 2), how)
    v1 = open_attention(V1)
    where = f"row 2 (episode {int(v1.episode[2])}, rollout {int(v1.rollout[2])})"
    with pytest.raises(StoreDamagedError) as err:
        open_attention(store).attention.values
    assert f"'attention', {where}" in str(err.value)
    assert_one_line_error(attnstore("export-pt", str(store), str(tmp_path / "pt"), "--no-progress"), where)
    verify = attnstore("inspect", "--verify", str(store))
    assert verify.returncode == 1 and f"attention: {where}:" in verify.stdout, verify.stdout + verify.stderr


def test_schema_v1_flipped_bytes_never_crash(tmp_path):
    """Without a checksum, flipped bytes inside a blosc block may decode (a limit of schema 1, which new
    stores do not have); what is guaranteed is no traceback and no crash: exit 0, or 2 with one line."""
    store = tmp_path / "store_v1.zarr"
    shutil.copytree(V1, store)
    for row in range(7):
        damage(chunk_file(store, S.ATTENTION, row), "flip")
    proc = attnstore("export-pt", str(store), str(tmp_path / "pt"), "--no-progress")
    if proc.returncode != 0:
        assert_one_line_error(proc, "'attention'")


def test_packed_store_damage_is_named(healthy, tmp_path):
    from attnstore import open_attention
    from attnstore.errors import StoreDamagedError
    from attnstore.store.pack import pack

    packed = tmp_path / "packed.zarr"
    pack(healthy["path"], packed, rows=2, progress=False)
    assert open_attention(packed).attention.shape[0] == len(healthy["rows"])
    shard = packed / S.ATTENTION / "c" / "1" / "0" / "0" / "0" / "0" / "0"  # rows 2-3
    damage(shard, "flip")
    with pytest.raises(StoreDamagedError, match=r"'attention', rows 2-3"):
        open_attention(packed).attention.values
    verify = attnstore("inspect", "--verify", str(packed))
    assert verify.returncode == 1 and "attention: rows 2-3" in verify.stdout, verify.stdout + verify.stderr


def test_status_reason_in_attrs_and_inspect(tmp_path):
    from attnstore import open_attention
    from attnstore.store.open import STATUS_REASON_ATTR
    from attnstore.store.writer import AttentionWriter

    spec = make_spec(encoding="portable", **SMALL)
    path = tmp_path / "attention.zarr"
    writer = AttentionWriter(path, spec)
    writer.append(synthetic_batch(spec, np.random.default_rng(0), [0], [0]))
    reason = "KeyboardInterrupt during episode 0 (Ctrl-C)"
    writer.close(status="interrupted", reason=reason)
    ds = open_attention(path)
    assert ds.attrs[STATUS_REASON_ATTR] == reason
    proc = attnstore("inspect", str(path))
    assert proc.returncode == 0, proc.stderr
    assert f"  reason:       {reason}\n" in proc.stdout
    assert STATUS_REASON_ATTR not in open_attention(V1).attrs  # a closed store has no reason


def test_remote_store_damage_is_named(healthy):
    """Through fsspec (zarr's async read path): a memory:// copy with a truncated and an absent chunk."""
    import fsspec

    from attnstore import open_attention
    from attnstore.errors import StoreDamagedError

    fs = fsspec.filesystem("memory")
    root = "/damaged-h1/attention.zarr"
    fs.put(str(healthy["path"]), root, recursive=True)
    key = chunk_file(healthy["path"], S.ATTENTION, 1).relative_to(healthy["path"]).as_posix()
    try:
        fs.pipe(f"{root}/{key}", fs.cat(f"{root}/{key}")[:20])
        with pytest.raises(StoreDamagedError, match=r"'attention', row 1 \(episode 0, rollout 1\).*checksum"):
            open_attention(f"memory://{root}").attention.values
        fs.rm(f"{root}/{key}")
        with pytest.raises(StoreDamagedError, match=r"'attention', row 1 \(episode 0, rollout 1\).*absent"):
            open_attention(f"memory://{root}").attention.values
    finally:
        fs.rm(root, recursive=True)
