"""AttentionWriter on a real Zarr v3 store on disk: round trips, batching, back-pressure, bad input.

Truth is what the test hands to the writer (tests/synthetic.py: probabilities with masked keys exactly
0, as in Pi0.5), kept in numpy here, and every check reads the store back from disk.
Small shapes (59 keys, 2 heads, 5 action tokens) keep the whole file at a few seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from attnstore import schema as S
from attnstore.errors import SchemaError, StoreError, WriterError
from attnstore.store.open import open_attention
from attnstore.schema import EpisodeRecord, StoreSpec
from attnstore.store.lock import lock_path
from attnstore.store.writer import AttentionWriter, InferenceBatch
from synthetic import make_spec, synthetic_batch

# ---- a small Pi0.5-shaped layout ------------------------------------------------------------------
# keys: image 0-15 | image2 16-31 | empty_camera_0 32-47 (missing) | language 48-53 | action 54-58
N_LANG = 6
N_ACT = 5
N_KEYS = 3 * 4 * 4 + N_LANG + N_ACT


def small_spec(encoding: str = "uint16", *, extras: bool = True, denoise=(0, 1, 2)) -> StoreSpec:
    return make_spec(
        layers=(1, 3), num_layers=None, denoise_steps=denoise, num_denoise_steps=len(denoise), encoding=encoding,
        images=extras, actions=extras, language_tokens=extras, num_language=N_LANG, num_action=N_ACT, grid=4,
        num_heads=2, image_size=8,
    )


def make_batch(spec: StoreSpec, rng, episodes, env_steps, keep=None) -> InferenceBatch:
    """One inference for len(episodes) batch elements, each with its own language length (1..6)."""
    n_valid = rng.integers(1, N_LANG + 1, len(episodes)).tolist()
    return synthetic_batch(spec, rng, episodes, env_steps, keep=keep, n_valid_language=n_valid)


def rows_of(batch: InferenceBatch) -> list[dict]:
    """The per-row truth of a batch (kept rows only), as plain numpy."""
    keep = np.ones(batch.batch_size, bool) if batch.keep is None else np.asarray(batch.keep)
    fields = ("attention", "key_valid", "language_token_id", "language_token_text", "images", "actions")
    out = []
    for i in np.flatnonzero(keep):
        row = {"episode": int(batch.episodes[i]), "env_step": int(batch.env_steps[i])}
        row.update({f: np.asarray(getattr(batch, f))[i] for f in fields if getattr(batch, f) is not None})
        out.append(row)
    return out


def assert_row_matches(ds, truth: dict, rollout: int, encoding: str) -> None:
    row = ds.sel(episode=truth["episode"], rollout=rollout)
    stored = row.attention.values
    expected = truth["attention"]
    err = np.abs(stored.astype(np.float64) - expected)
    assert err.max() <= S.MAX_ABS_ERROR[encoding], (truth["episode"], rollout, err.max())
    # masked keys (missing camera, language padding) are exactly 0, whatever the encoding
    assert (stored[..., ~truth["key_valid"]] == 0).all()
    np.testing.assert_array_equal(row.key_valid.values, truth["key_valid"])
    assert int(row.env_step) == truth["env_step"]
    for name in ("language_token_id", "language_token_text", "images", "actions"):
        if name in truth:
            np.testing.assert_array_equal(row[name].values, truth[name], err_msg=name)


def write_episodes(path, spec, lengths: dict[int, int], seed=0, **writer_kwargs):
    """B=1 episodes written one after another; returns {episode: [row truth, ...]}."""
    rng = np.random.default_rng(seed)
    truth: dict[int, list[dict]] = {}
    with AttentionWriter(path, spec, run={"test": "writer"}, **writer_kwargs) as writer:
        for ep, n in lengths.items():
            for r in range(n):
                batch = make_batch(spec, rng, [ep], [10 * r])
                writer.append(batch)
                truth.setdefault(ep, []).extend(rows_of(batch))
            writer.end_episode(EpisodeRecord(ep, "libero_object", ep, f"task {ep}", ep % 2 == 0, 10 * n))
    return truth


# ---- round trips -----------------------------------------------------------------------------------
@pytest.mark.parametrize("encoding", ["uint16", "float32"])
def test_ragged_episodes_round_trip(tmp_path, encoding):
    spec = small_spec(encoding)
    path = tmp_path / "attention.zarr"
    truth = write_episodes(path, spec, {0: 5, 1: 3, 4: 1})

    ds = open_attention(path)
    assert ds.sizes[S.INFERENCE] == 9
    for ep, rows in truth.items():
        assert sorted(ds.rollout.values[ds.episode.values == ep].tolist()) == list(range(len(rows)))
        for r, row in enumerate(rows):
            assert_row_matches(ds, row, r, encoding)
    stored = ds.attention.values
    if encoding == "uint16":
        # really quantised to k/65535 (and not stored as float32 behind our back)
        scaled = stored.astype(np.float64) * S.UINT16_SCALE
        assert np.abs(scaled - np.round(scaled)).max() < 1e-2
        everything = np.concatenate([r["attention"] for rows in truth.values() for r in rows])
        assert np.abs(np.sort(stored.ravel()) - np.sort(everything.ravel())).max() > 0
    # per-episode table
    assert ds[S.EPISODE_INDEX].values.tolist() == [0, 1, 4]
    assert ds[S.NUM_ENV_STEPS].values.tolist() == [50, 30, 10]
    assert ds[S.SUCCESS].values.tolist() == [True, False, True]
    assert ds[S.TASK].values.tolist() == ["task 0", "task 1", "task 4"]


def test_float32_is_bit_exact(tmp_path):
    spec = small_spec("float32", extras=False)
    truth = write_episodes(tmp_path / "a.zarr", spec, {3: 2})
    ds = open_attention(tmp_path / "a.zarr")
    for r, row in enumerate(truth[3]):
        np.testing.assert_array_equal(ds.attention.sel(episode=3, rollout=r).values, row["attention"])


def test_batched_rows_are_separate_episodes_and_dropped_rows_never_stored(tmp_path):
    # B=3 envs in lockstep: env 1 finishes after 2 inferences, env 2 after 3, env 0 runs 4.
    spec = small_spec()
    path = tmp_path / "attention.zarr"
    rng = np.random.default_rng(1)
    lengths = {10: 4, 11: 2, 12: 3}
    truth = {ep: [] for ep in lengths}
    dropped = []
    with AttentionWriter(path, spec) as writer:
        for step in range(4):
            keep = np.array([step < n for n in lengths.values()])
            batch = make_batch(spec, rng, list(lengths), [10 * step] * 3, keep=keep)
            writer.append(batch)
            for row in rows_of(batch):
                truth[row["episode"]].append(row)
            dropped += [batch.attention[i] for i in np.flatnonzero(~keep)]
        for ep in lengths:
            writer.end_episode(EpisodeRecord(ep, num_env_steps=10 * lengths[ep]))
    assert writer.stats.rows == sum(lengths.values())

    ds = open_attention(path)
    assert ds.sizes[S.INFERENCE] == 9
    counts = dict(zip(*np.unique(ds.episode.values, return_counts=True)))
    assert {int(k): int(v) for k, v in counts.items()} == lengths
    for ep, rows in truth.items():
        for r, row in enumerate(rows):
            assert_row_matches(ds, row, r, "uint16")
    stored = ds.attention.values
    for rejected in dropped:  # no stored row is (close to) a row the caller marked keep=False
        assert min(np.abs(stored[i] - rejected).max() for i in range(len(stored))) > 1e-3


def test_all_rows_dropped_writes_nothing(tmp_path):
    spec = small_spec(extras=False)
    rng = np.random.default_rng(2)
    with AttentionWriter(tmp_path / "a.zarr", spec) as writer:
        writer.append(make_batch(spec, rng, [0, 1], [0, 0], keep=[False, False]))
    ds = open_attention(tmp_path / "a.zarr")
    assert ds.sizes[S.INFERENCE] == 0


@pytest.mark.lerobot
def test_torch_bfloat16_tensors_are_accepted(tmp_path):
    torch = pytest.importorskip("torch")
    spec = small_spec(extras=False)
    batch = make_batch(spec, np.random.default_rng(3), [0], [0])
    as_bf16 = torch.from_numpy(batch.attention).to(torch.bfloat16)
    batch.attention = as_bf16
    with AttentionWriter(tmp_path / "a.zarr", spec) as writer:
        writer.append(batch)
    stored = open_attention(tmp_path / "a.zarr").attention.values[0]
    expected = as_bf16.float().numpy()
    assert np.abs(stored - expected).max() <= S.MAX_ABS_ERROR["uint16"]


# ---- back-pressure and thread errors ----------------------------------------------------------------
def test_slow_store_blocks_the_caller_instead_of_queueing(tmp_path):
    """With max_queue=1 and a writer that needs 0.15 s per inference, appends wait for it."""
    spec = small_spec(extras=False)
    rng = np.random.default_rng(4)
    delay, n = 0.15, 6
    writer = AttentionWriter(tmp_path / "a.zarr", spec, max_queue=1)
    waits = []
    for r in range(n):
        batch = make_batch(spec, rng, [0], [r])
        batch.ready = lambda: time.sleep(delay)  # runs on the writer thread: a slow device / disk
        t0 = time.perf_counter()
        writer.append(batch)
        waits.append(time.perf_counter() - t0)
        assert writer._queue.qsize() <= 1
    writer.close()
    assert writer.stats.max_queue_depth <= 1
    # One item in the queue and one in the writer's hands: from the third append on the caller waits
    # about one write time per append. Generous bounds: the machine is shared.
    assert sum(waits[2:]) >= 0.5 * delay * (n - 2), waits
    assert waits[0] < delay, waits
    assert writer.stats.rows == n


def test_error_in_writer_thread_is_reraised_on_next_append_as_one_line(tmp_path):
    spec = small_spec(extras=False)
    rng = np.random.default_rng(5)
    path = tmp_path / "a.zarr"
    writer = AttentionWriter(path, spec)
    good = make_batch(spec, rng, [0], [0])
    writer.append(good)
    writer.flush()
    bad = make_batch(spec, rng, [0], [10])

    def device_lost():
        raise RuntimeError("CUDA error: device-side assert triggered")

    bad.ready = device_lost
    writer.append(bad)
    with pytest.raises(WriterError) as info:
        writer.flush()
        writer.append(make_batch(spec, rng, [0], [20]))
    message = str(info.value)
    assert "\n" not in message
    assert "device-side assert" in message and "1 inferences committed" in message
    with pytest.raises(WriterError):  # and again at close: the run must not look finished
        writer.close()
    ds = open_attention(path)  # what was committed before the failure stays readable
    assert ds.sizes[S.INFERENCE] == 1
    assert np.abs(ds.attention.values[0] - good.attention[0]).max() <= S.MAX_ABS_ERROR["uint16"]


def test_error_in_writer_thread_is_reraised_at_close(tmp_path):
    spec = small_spec(extras=False)
    writer = AttentionWriter(tmp_path / "a.zarr", spec)
    batch = make_batch(spec, np.random.default_rng(6), [0], [0])
    batch.ready = lambda: 1 / 0
    writer.append(batch)
    with pytest.raises(WriterError, match="ZeroDivisionError"):
        writer.close()


def test_non_finite_attention_stops_the_writer_with_a_clear_message(tmp_path):
    """uint16 cannot hold NaN (e.g. an fp16 overflow in the policy): say so and how to keep them."""
    spec = small_spec(extras=False)
    rng = np.random.default_rng(13)
    path = tmp_path / "a.zarr"
    writer = AttentionWriter(path, spec)
    good = make_batch(spec, rng, [0], [0])
    writer.append(good)
    bad = make_batch(spec, rng, [0], [10])
    bad.attention[0, 1, 0, 1, 2, 3] = np.nan
    writer.append(bad)
    with pytest.raises(WriterError) as info:
        writer.close()
    message = str(info.value)
    assert "\n" not in message and "non-finite" in message and "float32" in message, message
    assert "env step 10" in message and "episode 0" in message, message
    ds = open_attention(path)
    assert ds.env_step.values.tolist() == [0]


def test_float32_encoding_keeps_non_finite_values(tmp_path):
    spec = small_spec("float32", extras=False)
    batch = make_batch(spec, np.random.default_rng(14), [0], [0])
    batch.attention[0, 0, 0, 0, 0, :2] = [np.nan, np.inf]
    with AttentionWriter(tmp_path / "a.zarr", spec) as writer:
        writer.append(batch)
    np.testing.assert_array_equal(open_attention(tmp_path / "a.zarr").attention.values[0], batch.attention[0])


# ---- bad input: refused on the caller's thread, nothing half-written ------------------------------
@pytest.mark.parametrize(
    "field, value, pattern",
    [
        ("attention", np.zeros((1, 3, 2, 2, 5, N_KEYS + 1), np.float32), "attention: expected shape"),
        ("key_valid", np.ones((1, N_KEYS - 1), bool), "key_valid: expected shape"),
        ("env_steps", np.array([0, 1]), "env_steps: expected 1 values"),
        ("images", None, "images is required"),
        ("actions", np.zeros((1, N_ACT, 6), np.float32), "actions: expected shape"),
        ("times", np.array([1.0, 0.5, 0.0]), "times"),
        ("times", np.array([1.0, 2 / 3]), "times"),
        ("keep", [True, False], "keep: expected 1 flags"),
    ],
)
def test_bad_batch_raises_schema_error_at_append_and_writer_goes_on(tmp_path, field, value, pattern):
    spec = small_spec()
    rng = np.random.default_rng(7)
    path = tmp_path / "a.zarr"
    writer = AttentionWriter(path, spec)
    first = make_batch(spec, rng, [0], [0])
    writer.append(first)
    bad = make_batch(spec, rng, [0], [10])
    setattr(bad, field, value)
    with pytest.raises(SchemaError, match=pattern) as info:
        writer.append(bad)
    assert "\n" not in str(info.value)
    writer.append(make_batch(spec, rng, [0], [20]))
    writer.close()
    ds = open_attention(path)
    assert ds.env_step.values.tolist() == [0, 20]


def test_times_of_another_schedule_are_refused(tmp_path):
    # 10-step schedule keeping steps 0 and 9: the times are (1.0, 0.1), not (1.0, 0.9)
    base = small_spec(extras=False)
    spec = StoreSpec(layout=base.layout, layers=base.layers, denoise_steps=(0, 9), num_denoise_steps=10,
                     num_heads=2, store_language_tokens=False)
    assert spec.times == (1.0, pytest.approx(0.1))
    rng = np.random.default_rng(8)
    with AttentionWriter(tmp_path / "a.zarr", spec) as writer:
        batch = make_batch(spec, rng, [0], [0])
        batch.times = np.array([1.0, 0.9])
        with pytest.raises(SchemaError, match="differ from the store's"):
            writer.append(batch)
        batch.times = np.array([1.0, 0.1])
        writer.append(batch)
    assert open_attention(tmp_path / "a.zarr").time.values.tolist() == pytest.approx([1.0, 0.1])


# ---- modes: create / overwrite / append --------------------------------------------------------------
def test_create_refuses_an_existing_path_and_leaves_it_alone(tmp_path):
    spec = small_spec(extras=False)
    path = tmp_path / "a.zarr"
    write_episodes(path, spec, {0: 2})
    before = sorted(p.relative_to(path) for p in path.rglob("*"))
    with pytest.raises(StoreError, match="already exists") as info:
        AttentionWriter(path, spec)
    assert "\n" not in str(info.value)
    assert sorted(p.relative_to(path) for p in path.rglob("*")) == before
    assert open_attention(path).sizes[S.INFERENCE] == 2


def test_overwrite_replaces_an_attnstore_store(tmp_path):
    spec = small_spec(extras=False)
    path = tmp_path / "a.zarr"
    write_episodes(path, spec, {0: 3})
    truth = write_episodes(path, spec, {7: 1}, seed=9, mode="overwrite")
    ds = open_attention(path)
    assert ds.episode.values.tolist() == [7]
    assert_row_matches(ds, truth[7][0], 0, "uint16")


def test_overwrite_refuses_a_folder_that_is_not_a_store(tmp_path):
    spec = small_spec(extras=False)
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "thesis.tex").write_text("precious")
    with pytest.raises(StoreError, match="not a zarr v3 store") as info:
        AttentionWriter(folder, spec, mode="overwrite")
    assert "\n" not in str(info.value)
    assert (folder / "thesis.tex").read_text() == "precious"


def test_overwrite_refuses_a_foreign_zarr_group(tmp_path):
    spec = small_spec(extras=False)
    path = tmp_path / "other.zarr"
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    group.create_array("x", shape=(3,), dtype="int32")[:] = [1, 2, 3]
    with pytest.raises(SchemaError, match="not an attnstore attention store"):
        AttentionWriter(path, spec, mode="overwrite")
    assert zarr.open_group(str(path), mode="r")["x"][:].tolist() == [1, 2, 3]


def test_append_adds_rows_and_continues_rollout_numbering(tmp_path):
    spec = small_spec()
    path = tmp_path / "a.zarr"
    first = write_episodes(path, spec, {0: 3, 1: 2}, seed=10)
    # the second run resumes episode 1 (e.g. an interrupted eval) and adds episode 2
    second = write_episodes(path, spec, {1: 2, 2: 1}, seed=11, mode="append")
    ds = open_attention(path)
    assert ds.sizes[S.INFERENCE] == 8
    rows = {0: first[0], 1: first[1] + second[1], 2: second[2]}
    for ep, truth in rows.items():
        assert sorted(ds.rollout.values[ds.episode.values == ep].tolist()) == list(range(len(truth)))
        for r, row in enumerate(truth):
            assert_row_matches(ds, row, r, "uint16")
    assert ds.attrs["attnstore_status"] == "closed"


def test_append_with_another_spec_refuses_and_keeps_the_store(tmp_path):
    spec = small_spec(extras=False)
    path = tmp_path / "a.zarr"
    write_episodes(path, spec, {0: 2})
    other = small_spec("float32", extras=False)
    with pytest.raises(StoreError, match="another capture spec") as info:
        AttentionWriter(path, other, mode="append")
    assert "\n" not in str(info.value)
    ds = open_attention(path)
    assert ds.sizes[S.INFERENCE] == 2 and ds.attrs["attnstore_status"] == "closed"
    assert not lock_path(path).exists()  # the refused writer let go of the store


def test_append_to_a_missing_store_refuses(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        AttentionWriter(tmp_path / "nope.zarr", small_spec(), mode="append")
    assert not (tmp_path / "nope.zarr").exists()


def test_a_second_writer_on_a_live_store_is_refused(tmp_path):
    """Two writers appending to one store would both write row n (and its index chunk): lost rows."""
    spec = small_spec(extras=False)
    path = tmp_path / "a.zarr"
    write_episodes(path, spec, {0: 1})
    rng = np.random.default_rng(15)
    first = AttentionWriter(path, spec, mode="append")
    first.append(make_batch(spec, rng, [1], [0]))
    for mode in ("append", "overwrite"):
        with pytest.raises(StoreError, match="being written by another writer") as info:
            AttentionWriter(path, spec, mode=mode)
        assert "\n" not in str(info.value) and str(os.getpid()) in str(info.value)
    first.append(make_batch(spec, rng, [1], [10]))
    first.close()
    ds = open_attention(path)
    assert ds.episode.values.tolist() == [0, 1, 1] and ds.rollout.values.tolist() == [0, 0, 1]
    # once the first writer closed, appending works again
    write_episodes(path, spec, {2: 1}, mode="append")
    assert open_attention(path).sizes[S.INFERENCE] == 4


def test_the_lock_of_a_dead_writer_does_not_block(tmp_path):
    spec = small_spec(extras=False)
    path = tmp_path / "a.zarr"
    write_episodes(path, spec, {0: 1})
    dead_pid = subprocess.Popen(["true"])  # a pid that has exited (and been reaped)
    dead_pid.wait()
    lock_path(path).write_text(json.dumps({"pid": dead_pid.pid, "host": os.uname().nodename}))
    write_episodes(path, spec, {1: 1}, mode="append")
    assert open_attention(path).sizes[S.INFERENCE] == 2
    assert not lock_path(path).exists()  # released at close


def _set_schema_version(path: Path, version: int) -> None:
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"][S.ROOT_ATTR]["schema_version"] = version
    meta.pop("consolidated_metadata", None)
    (path / "zarr.json").write_text(json.dumps(meta))


def test_another_schema_version_is_refused_by_reader_and_writer(tmp_path):
    spec = small_spec(extras=False)
    path = tmp_path / "a.zarr"
    write_episodes(path, spec, {0: 1})
    _set_schema_version(path, S.SCHEMA_VERSION + 1)
    for action in (lambda: open_attention(path), lambda: AttentionWriter(path, spec, mode="append")):
        with pytest.raises(SchemaError, match=f"schema version {S.SCHEMA_VERSION + 1}") as info:
            action()
        assert "\n" not in str(info.value)


def test_a_foreign_zarr_group_is_refused_by_the_reader(tmp_path):
    path = tmp_path / "other.zarr"
    zarr.open_group(str(path), mode="w", zarr_format=3).attrs["hello"] = "world"
    with pytest.raises(SchemaError, match="not an attnstore attention store") as info:
        open_attention(path)
    assert "\n" not in str(info.value)


# ---- a full disk (real: a 2 MiB tmpfs) ----------------------------------------------------------
@pytest.fixture
def tiny_disk(tmp_path):
    mount_point = tmp_path / "tiny_disk"
    mount_point.mkdir()
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
            capture_output=True, text=True, timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"full-disk test needs `mount -t tmpfs` (root): {exc}")
    if done.returncode != 0:
        pytest.skip(f"full-disk test needs `mount -t tmpfs` (root): {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=False, timeout=30)


def test_full_disk_says_so_and_keeps_committed_rows_readable(tiny_disk):
    spec = small_spec("float32", extras=False, denoise=tuple(range(10)))  # ~47 kB per row, barely compressible
    path = tiny_disk / "attention.zarr"
    rng = np.random.default_rng(12)
    writer = AttentionWriter(path, spec)
    committed = []
    for r in range(3):
        batch = make_batch(spec, rng, [0], [r])
        writer.append(batch)
        committed.append(batch.attention[0])
    writer.flush()
    # fill what is left with a file, leaving room for a bit more than one row
    stat = os.statvfs(tiny_disk)
    with open(tiny_disk / "filler", "wb") as f:
        f.write(b"\0" * max(0, stat.f_bavail * stat.f_frsize - 80_000))
    with pytest.raises(WriterError) as info:
        for r in range(3, 60):
            batch = make_batch(spec, rng, [0], [r])
            writer.append(batch)
            writer.flush()
            committed.append(batch.attention[0])
    message = str(info.value)
    assert message.startswith("disk full") and "\n" not in message, message
    with pytest.raises(WriterError, match="disk full"):
        writer.close()
    # the disk is still full: reading must not need space
    ds = open_attention(path)
    assert ds.sizes[S.INFERENCE] == len(committed) >= 3
    for r, expected in enumerate(committed):
        np.testing.assert_array_equal(ds.attention.sel(episode=0, rollout=r).values, expected)
