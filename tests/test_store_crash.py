"""Crash safety: a writer process killed with SIGKILL leaves a store that opens with exactly its
committed rows, values intact, and that a new run can append to.

The child writes full-width rows (the real 1018-key axis, 10 denoise steps, 2 layers, 4 heads: 16 MB
of float32 each, ~0.1 s to encode and write) so that a kill at a random moment usually lands inside
a write. It reports on stdout (a side channel) before each append ("A k") and after each flush
("C k"), and likewise for episode records ("E e" / "F e"). The parent kills it a random 0-0.3 s after
a chosen commit and checks the store against what the child had reported.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from attnstore import schema as S
from attnstore.store.open import open_attention
from attnstore.store.lock import lock_path
from attnstore.store.writer import AttentionWriter
from synthetic import make_spec, synthetic_batch, write_synthetic_store

TESTS_DIR = Path(__file__).resolve().parent
ROWS_PER_EPISODE = 3
POOL_SEED = 123


def crash_spec():
    return make_spec(num_heads=4, images=False, actions=False, num_layers=18)


def row_attention(pool: list[np.ndarray], k: int) -> np.ndarray:
    """Global row k: a pool entry rolled along the action-token axis by k (distinct rows, cheap to make)."""
    return np.roll(pool[k % len(pool)], k, axis=-2)


def make_pool(spec, n: int = 2):
    """(batch template, pool of attention rows); both processes build it from the same seed."""
    rng = np.random.default_rng(POOL_SEED)
    template = synthetic_batch(spec, rng, [0], [0])
    pool = [synthetic_batch(spec, rng, [0], [0]).attention[0] for _ in range(n)]
    return template, pool


CHILD = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests_dir!r})
    import numpy as np
    from attnstore.schema import EpisodeRecord
    from attnstore.store.writer import AttentionWriter
    from test_store_crash import ROWS_PER_EPISODE, crash_spec, make_pool, row_attention

    spec = crash_spec()
    template, pool = make_pool(spec)
    writer = AttentionWriter({path!r}, spec, mode={mode!r})
    start = {start}
    for k in range(start, start + 1000):
        ep, r = divmod(k, ROWS_PER_EPISODE)
        template.episodes = np.array([ep]); template.env_steps = np.array([10 * r])
        template.attention = row_attention(pool, k)[None]
        print("A", k, flush=True)
        writer.append(template)
        writer.flush()
        print("C", k, flush=True)
        if r == ROWS_PER_EPISODE - 1:
            print("E", ep, flush=True)
            writer.end_episode(EpisodeRecord(ep, task="t", num_env_steps=10 * ROWS_PER_EPISODE))
            writer.flush()
            print("F", ep, flush=True)
    """
)


def run_and_kill(path: Path, kill_after_commit: int, delay: float, *, mode="create", start=0) -> list[tuple[str, int]]:
    """Start the child, SIGKILL it ``delay`` s after it reports commit ``kill_after_commit``; its report."""
    code = CHILD.format(tests_dir=str(TESTS_DIR), path=str(path), mode=mode, start=start)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[tuple[str, int]] = []
    try:
        deadline = time.monotonic() + 120
        for raw in proc.stdout:
            tag, value = raw.split()
            lines.append((tag, int(value)))
            if tag == "C" and int(value) >= kill_after_commit:
                time.sleep(delay)
                proc.send_signal(signal.SIGKILL)
                break
            assert time.monotonic() < deadline, "child too slow"
        # whatever it printed before the kill landed, read through the same file object: communicate()
        # would read the pipe's descriptor directly and lose what the line iterator had buffered (or
        # hand back half a line)
        rest = proc.stdout.read()
        err = proc.stderr.read()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, err
    lines += [(t, int(v)) for t, v in (line.split() for line in rest.splitlines())]
    return lines


def expected_after_kill(lines, start=0) -> tuple[set[int], set[int], set[int], set[int]]:
    """(rows that must be there, rows that may be there, episodes that must be, episodes that may be)."""
    committed = {v for t, v in lines if t == "C"}
    finished = {v for t, v in lines if t == "F"}
    must_rows = set(range(start)) | committed
    may_rows = set(must_rows)
    must_eps = set(range(start // ROWS_PER_EPISODE)) | finished
    may_eps = set(must_eps)
    last_tag, last_value = lines[-1]
    if last_tag == "A":  # killed with an append in flight: that row is either all there or invisible
        may_rows.add(last_value)
    if last_tag == "E":
        may_eps.add(last_value)
    return must_rows, may_rows, must_eps, may_eps


def check_store(path: Path, lines, pool, start=0) -> int:
    must_rows, may_rows, must_eps, may_eps = expected_after_kill(lines, start)
    ds = open_attention(path)
    assert ds.attrs["attnstore_status"] == "writing"
    stored = [ROWS_PER_EPISODE * int(e) + int(r) for e, r in zip(ds.episode.values, ds.rollout.values)]
    assert stored == sorted(stored), "rows out of commit order"
    assert must_rows <= set(stored) <= may_rows, (sorted(stored), lines[-3:])
    assert ds.env_step.values.tolist() == [10 * (k % ROWS_PER_EPISODE) for k in stored]
    values = ds.attention.values
    for i, k in enumerate(stored):  # every visible row is complete and intact
        assert np.abs(values[i] - row_attention(pool, k)).max() <= S.MAX_ABS_ERROR["uint16"], k
    eps = set(ds.episode_index.values.tolist())
    assert must_eps <= eps <= may_eps, (eps, lines[-3:])
    assert (ds.num_env_steps.values == 10 * ROWS_PER_EPISODE).all()
    return len(stored)


@pytest.fixture(scope="module")
def pool():
    return make_pool(crash_spec())[1]


def test_sigkill_at_random_moments_leaves_exactly_the_committed_rows(tmp_path, pool):
    rnd = random.Random(int(os.environ.get("ATTNSTORE_CRASH_SEED", "2026")))
    hidden_rows_seen = 0
    for trial in range(3):
        path = tmp_path / f"kill{trial}.zarr"
        lines = run_and_kill(path, kill_after_commit=rnd.randint(1, 4), delay=rnd.uniform(0.0, 0.3))
        visible = check_store(path, lines, pool)
        raw = zarr.open_group(str(path), mode="r", use_consolidated=False)
        hidden_rows_seen += raw[S.ATTENTION].shape[0] - visible
    # (informative: kills that landed after a resize but before the commit marker)
    print(f"rows resized but uncommitted across kills: {hidden_rows_seen}")


def test_a_killed_store_can_be_appended_to_and_killed_again(tmp_path, pool):
    path = tmp_path / "resume.zarr"
    first = run_and_kill(path, kill_after_commit=3, delay=0.05)
    n_first = check_store(path, first, pool)
    # resume on a whole episode boundary, as a resumed eval would (a fresh episode index)
    start = ROWS_PER_EPISODE * (n_first // ROWS_PER_EPISODE + 1)
    second = run_and_kill(path, kill_after_commit=start + 2, delay=0.1, mode="append", start=start)
    ds = open_attention(path)
    kept_first = list(range(n_first))
    stored = [ROWS_PER_EPISODE * int(e) + int(r) for e, r in zip(ds.episode.values, ds.rollout.values)]
    assert stored[: len(kept_first)] == kept_first
    must, may, _, _ = expected_after_kill(second, start)
    assert {k for k in must if k >= start} <= set(stored[len(kept_first):]) <= {k for k in may if k >= start}
    values = ds.attention.values
    for i, k in enumerate(stored):
        assert np.abs(values[i] - row_attention(pool, k)).max() <= S.MAX_ABS_ERROR["uint16"], k


# ---- a kill between resizes: arrays of the inference axis left at different lengths ------------
@pytest.fixture(params=["snapshot", "no snapshot"])
def committed_store(tmp_path, request):
    spec = make_spec(num_language=6, num_action=5, grid=4, num_heads=2, image_size=8)
    truth = write_synthetic_store(tmp_path / "a.zarr", spec, episodes={0: 3, 1: 2}, status="writing",
                                  finish_episodes={0})
    if request.param == "no snapshot":  # as an attnstore before the readers' snapshot left a killed store
        root = tmp_path / "a.zarr" / "zarr.json"
        meta = json.loads(root.read_text())
        assert meta.pop("consolidated_metadata")
        root.write_text(json.dumps(meta))
    # that writer is left open in this process; a killed one leaves its lock naming a dead process
    gone = subprocess.Popen(["true"])
    gone.wait()
    lock_path(tmp_path / "a.zarr").write_text(f'{{"pid": {gone.pid}, "host": "{os.uname().nodename}"}}')
    return truth


def _grow(path: Path, names, by: int = 1, write: bool = True) -> None:
    """What a kill mid-``_write_batch`` leaves: some arrays resized (and maybe written), others not."""
    group = zarr.open_group(str(path), mode="r+", use_consolidated=False)
    for name in names:
        arr = group[name]
        n = arr.shape[0]
        arr.resize((n + by, *arr.shape[1:]))
        if write:
            arr[n:] = "x" if arr.dtype.kind in "OUT" else np.ones((by, *arr.shape[1:]), dtype=arr.dtype)


def assert_committed_rows_intact(path: Path, truth) -> None:
    if json.loads((path / "zarr.json").read_text()).get("consolidated_metadata"):
        plain = xr.open_zarr(path)  # the snapshot: every array at the last commit's length
        assert plain.sizes[S.INFERENCE] == len(truth["rows"])
        assert (plain.episode.values != S.UNCOMMITTED).all()
    ds = open_attention(path)
    assert list(zip(ds.episode.values.tolist(), ds.rollout.values.tolist())) == truth["rows"]
    assert np.abs(ds.attention.values - truth["attention"]).max() <= S.MAX_ABS_ERROR["uint16"]
    np.testing.assert_array_equal(ds.images.values, truth["images"])
    np.testing.assert_array_equal(ds.language_token_text.values, truth["language_token_text"])
    assert ds.episode_index.values.tolist() == [0]


@pytest.mark.parametrize(
    "grown",
    [
        [S.ATTENTION],  # killed after the first resize
        [S.ATTENTION, S.KEY_VALID, S.LANGUAGE_TOKEN_ID, S.LANGUAGE_TOKEN_TEXT, S.IMAGES],  # part way
        [S.ATTENTION, S.KEY_VALID, S.LANGUAGE_TOKEN_ID, S.LANGUAGE_TOKEN_TEXT, S.IMAGES, S.ACTIONS,
         S.ENV_STEP, S.ROLLOUT],  # everything but the commit marker
    ],
)
def test_uneven_inference_arrays_open_with_committed_rows_only(committed_store, grown):
    path = committed_store["path"]
    _grow(path, grown)
    assert_committed_rows_intact(path, committed_store)
    # asked-for dask chunks hold on this path too (not one chunk for the whole array)
    ds = open_attention(path, chunks={S.INFERENCE: 2})
    assert ds.attention.data.chunks[0] == (2, 2, 1)
    assert np.abs(ds.attention.values - committed_store["attention"]).max() <= S.MAX_ABS_ERROR["uint16"]


def test_resized_but_unwritten_commit_marker_hides_the_row(committed_store):
    path = committed_store["path"]
    data = [S.ATTENTION, S.KEY_VALID, S.LANGUAGE_TOKEN_ID, S.LANGUAGE_TOKEN_TEXT, S.IMAGES, S.ACTIONS,
            S.ENV_STEP, S.ROLLOUT]
    _grow(path, data)
    _grow(path, [S.EPISODE], write=False)  # resized, marker still the fill value
    assert_committed_rows_intact(path, committed_store)


def test_uneven_episode_table_opens_with_finished_episodes_only(committed_store):
    path = committed_store["path"]
    _grow(path, [S.TASK_GROUP, S.TASK_ID, S.TASK])  # killed inside _write_episode
    assert_committed_rows_intact(path, committed_store)


def test_append_after_an_uneven_kill_continues_cleanly(committed_store):
    path = committed_store["path"]
    spec = committed_store["spec"]
    _grow(path, [S.ATTENTION, S.KEY_VALID])
    with AttentionWriter(path, spec, mode="append") as writer:
        batch = synthetic_batch(spec, np.random.default_rng(9), [1], [20])
        writer.append(batch)
    ds = open_attention(path)
    assert list(zip(ds.episode.values.tolist(), ds.rollout.values.tolist())) == committed_store["rows"] + [(1, 2)]
    assert np.abs(ds.attention.values[-1] - batch.attention[0]).max() <= S.MAX_ABS_ERROR["uint16"]
    assert np.abs(ds.attention.values[:-1] - committed_store["attention"]).max() <= S.MAX_ABS_ERROR["uint16"]
