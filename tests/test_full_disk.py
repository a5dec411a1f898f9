"""A failing attention writer stops the capture, never the evaluation.

The real case: ``--attention.store`` on a small, real tmpfs that fills after the first inference or two,
``--output_dir`` elsewhere. lerobot's results must all be there (``eval_info.json``, every video, exit 0),
stderr has one ``attnstore:`` line about the full disk, and the store opens as ``interrupted`` with the
reason in its root attrs and every committed row readable. Without LIBERO: a refused NaN row and a writer
failure found only at close, through :class:`~attnstore.evaluation.capture_writer.CaptureWriter`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from attnstore import schema as S
from attnstore.evaluation.capture_writer import CaptureWriter
from attnstore.store.open import STATUS_ATTR, open_attention, read_spec
from attnstore.store.writer import AttentionWriter
from synthetic import make_spec, synthetic_batch

# one inference of the tiny policy is ~4.5 MB on disk (uint16 near-uniform attention + images); the run makes 6
# (~29 MB expected). 16 MB pass the eval's disk preflight (it refuses below the ~11 MB minimum, and warns below
# the expected size) and hold the store and its first few inferences, not all of them
TMPFS_SIZE = "16m"
EPISODES = 2
EPISODE_LENGTH = 30


@pytest.fixture
def small_disk(tmp_path):
    where = tmp_path / "disk"
    where.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode}): no real full disk")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.mark.libero
@pytest.mark.lerobot
def test_full_disk_stops_the_capture_and_lerobot_finishes(small_disk, tmp_path):
    from attnstore.capture.checkpoint import ensure_tiny_checkpoint

    out = tmp_path / "eval"
    store = small_disk / "attention.zarr"
    cmd = [
        sys.executable, "-c", "import sys; from attnstore.cli import main; sys.exit(main())", "eval",
        f"--policy.path={ensure_tiny_checkpoint()}", "--env.type=libero", "--env.task=libero_object",
        "--env.task_ids=[0]", "--env.observation_height=128", "--env.observation_width=128",
        "--eval.use_async_envs=false", f"--eval.n_episodes={EPISODES}", "--eval.batch_size=1",
        f"--env.episode_length={EPISODE_LENGTH}", f"--output_dir={out}", f"--attention.store={store}",
    ]
    env = dict(os.environ, MUJOCO_GL="egl", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    info = json.loads((out / "eval_info.json").read_text())  # lerobot's results are all there
    assert info["overall"]["n_episodes"] == EPISODES
    videos = sorted((out / "videos").rglob("*.mp4"))
    assert len(videos) == EPISODES and all(v.stat().st_size > 0 for v in videos)

    lines = [ln for ln in proc.stderr.replace("\r", "\n").splitlines() if ln.startswith("attnstore:")]
    warned = [ln for ln in lines if ln.startswith("attnstore: warning: ") and "may stop with a full disk" in ln]
    assert len(warned) == 1, lines  # the preflight said so before the first episode
    lines = [ln for ln in lines if ln not in warned]
    assert len(lines) == 1, lines
    assert "disk full" in lines[0] and "capture stopped" in lines[0], lines
    assert "Traceback" not in proc.stderr
    assert "INTERRUPTED" in proc.stdout

    _, root = read_spec(store)
    ds = open_attention(store)
    assert ds.attrs[STATUS_ATTR] == "interrupted"
    assert "disk full" in root["status_reason"]
    n = ds.sizes[S.INFERENCE]
    assert 1 <= n < EPISODES * EPISODE_LENGTH // 10, n
    assert f"the {n} inferences committed before stay readable" in lines[0]
    values = ds.attention.values.astype(np.float64)  # every committed row, whole
    valid = ds[S.KEY_VALID].values[:, None, None, None, None, :]
    assert np.allclose(np.where(valid, values, 0).sum(-1), 1, atol=1e-2)
    assert ds[S.ENV_STEP].values.tolist() == [10 * r for r in range(n)]


# ---- without a simulation -----------------------------------------------------------------------------
SPEC = make_spec(num_language=6, num_action=3, grid=2, num_heads=2, image_size=4, layers=(0,), num_layers=1,
                 denoise_steps=(0, 9))


def test_a_refused_nan_row_stops_the_capture_and_closes_the_store_interrupted(tmp_path, capsys):
    rng = np.random.default_rng(0)
    path = tmp_path / "attention.zarr"
    writer = CaptureWriter(AttentionWriter(path, SPEC))
    writer.append(synthetic_batch(SPEC, rng, [0], [0]))
    writer.writer.flush()
    bad = synthetic_batch(SPEC, rng, [0], [10])
    bad.attention[0, 0, 0, 0, 0, 0] = np.nan
    writer.append(bad)  # refused on the writer thread ...
    while writer.writer.pending:
        time.sleep(0.01)
    for step in (20, 30):
        writer.append(synthetic_batch(SPEC, rng, [0], [step]))  # ... found here: no exception, no-ops after
    assert writer.stopped and "non-finite" in writer.failure
    writer.end_episode(S.EpisodeRecord(episode=0, success=False, num_env_steps=40))  # a no-op
    writer.close()  # the runner's final close: nothing more to say
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("attnstore: attention capture stopped: "), err
    ds = open_attention(path)
    assert ds.attrs[STATUS_ATTR] == "interrupted"
    assert "non-finite" in read_spec(path)[1]["status_reason"]
    assert ds[S.ENV_STEP].values.tolist() == [0]


def test_a_failure_found_only_at_close_is_reported_once(tmp_path, capsys):
    rng = np.random.default_rng(1)
    path = tmp_path / "attention.zarr"
    writer = CaptureWriter(AttentionWriter(path, SPEC))
    writer.append(synthetic_batch(SPEC, rng, [0], [0]))
    bad = synthetic_batch(SPEC, rng, [0], [10])
    bad.attention[:] = np.inf
    writer.append(bad)  # the last inference of the run fails; nothing follows it
    stats = writer.close()
    assert stats.rows == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "non-finite" in err[0], err
    assert open_attention(path).attrs[STATUS_ATTR] == "interrupted"


def test_the_writer_records_a_reason_and_a_clean_close_has_none(tmp_path):
    rng = np.random.default_rng(2)
    for status, reason in (("interrupted", "interrupted by Ctrl-C (SIGINT)"), ("closed", None)):
        path = tmp_path / f"{status}.zarr"
        writer = AttentionWriter(path, SPEC)
        writer.append(synthetic_batch(SPEC, rng, [0], [0]))
        writer.close(status=status, reason=reason)
        _, root = read_spec(path)
        assert root["status"] == status and root.get("status_reason") == reason


def fill_up(where: Path) -> int:
    """Write a filler file into ``where`` until the file system refuses one more byte; return its size."""
    filler = where / "filler"
    written = 0
    with open(filler, "wb", buffering=0) as f:
        for block in (1 << 20, 1 << 16, 1 << 12, 1 << 8, 1):
            while True:
                try:
                    f.write(b"\1" * block)
                except OSError:
                    break
                written += block
    return written


def test_a_disk_full_to_the_last_byte_still_closes_the_store_interrupted(small_disk, capsys):
    """The run fills the disk completely (a filler file takes every byte left after the first commit): the
    next inference fails, and the close still records ``interrupted`` with the reason, because the writer's
    reserve file (store/snapshot.py) gives the final root ``zarr.json`` its space. Without it the status stayed
    ``writing``."""
    from attnstore.store.snapshot import RESERVE

    rng = np.random.default_rng(3)
    path = small_disk / "attention.zarr"
    writer = CaptureWriter(AttentionWriter(path, SPEC))
    writer.append(synthetic_batch(SPEC, rng, [0], [0]))
    writer.writer.flush()
    assert (path / RESERVE).is_file()
    assert fill_up(small_disk) > 0
    with pytest.raises(OSError):  # really full: not even one byte more
        (small_disk / "one_more").write_bytes(b"x")
    writer.append(synthetic_batch(SPEC, rng, [0], [10]))  # fails on the writer thread: the disk is full ...
    while writer.writer.pending:
        time.sleep(0.01)
    for step in (20, 30):
        writer.append(synthetic_batch(SPEC, rng, [0], [step]))  # ... found here; no-ops after
    writer.close()
    assert writer.stopped and "disk full" in (writer.failure or ""), writer.failure
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("attnstore: attention capture stopped: "), err
    _, root = read_spec(path)
    assert root["status"] == "interrupted" and "disk full" in root["status_reason"], root
    assert not (path / RESERVE).exists()
    ds = open_attention(path)
    assert ds[S.ENV_STEP].values.tolist() == [0]  # the committed row, readable
    np.testing.assert_allclose(ds.attention.sum("key").values, 1, atol=5e-3)
