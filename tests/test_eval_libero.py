"""End to end: ``attnstore eval`` on real LIBERO (libero_object task 0) with the tiny Pi0.5.

One batched run (3 episodes, 2 sync envs, so the second batch has a row lerobot discards; episodes
0 and 2 recorded, so episode 1 runs unrecorded beside episode 0; 15 env steps per episode at
128x128 to keep CI short) is checked against references the code under test
does not produce: lerobot's own eval_info.json, the mp4 videos lerobot wrote (decoded with PyAV),
LIBERO's task text and the checkpoint's n_action_steps. A second run is stopped with SIGINT and
must leave every committed inference readable. About 2-3 min in total on 2 CPU cores.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from attnstore import schema as S

pytestmark = [pytest.mark.libero, pytest.mark.lerobot]

EPISODE_LENGTH = 15
N_EPISODES = 3
BATCH = 2
RECORDED = [0, 2]  # --attention.episodes: episode 1 runs beside episode 0 (row 1 of batch 0) unrecorded
OBS = 128  # env camera size: rendering dominates the cost, the policy resizes to 224 anyway


def _eval_command(policy: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-c",
        "import sys; from attnstore.cli import main; sys.exit(main())",
        "eval",
        f"--policy.path={policy}",
        "--env.type=libero",
        "--env.task=libero_object",
        "--env.task_ids=[0]",
        f"--env.observation_height={OBS}",
        f"--env.observation_width={OBS}",
        "--eval.use_async_envs=false",
        f"--output_dir={out}",
        *extra,
    ]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("HF_HUB_OFFLINE", None)  # attnstore eval must go offline by itself for the tiny policy
    return env


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from attnstore.capture.tiny import make_tiny_policy

    return make_tiny_policy(tmp_path_factory.mktemp("tiny") / "tiny_pi05")


@pytest.fixture(scope="module")
def batched_run(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run"
    cmd = _eval_command(
        tiny_checkpoint,
        out,
        f"--eval.n_episodes={N_EPISODES}",
        f"--eval.batch_size={BATCH}",
        f"--env.episode_length={EPISODE_LENGTH}",
        "--attention.episodes=[0,2]",
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def _video_frames(path: Path) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_summary_says_where_everything_went(batched_run):
    out, stdout = batched_run
    for what in ("eval_info.json", "videos", "attention.zarr", "episodes recorded  2 of 3", "success rate"):
        assert what in stdout
    assert str(out / "attention.zarr") in stdout


def test_store_opens_with_xarray_and_has_one_row_per_inference(batched_run, tiny_checkpoint):
    # lerobot ran 2 batches x 2 envs; its 4th rollout (episode 3) is discarded and must not be stored,
    # episode 1 was not asked for
    check_rows_per_inference(batched_run[0], tiny_checkpoint, RECORDED)


def check_rows_per_inference(out: Path, checkpoint: Path, recorded: list[int]) -> None:
    import xarray as xr

    ds = xr.open_zarr(out / "attention.zarr")
    n_action_steps = json.loads((checkpoint / "config.json").read_text())["n_action_steps"]
    episodes = ds[S.EPISODE].values
    assert sorted(set(episodes.tolist())) == recorded
    for ep in recorded:
        frames = len(_video_frames(out / "videos" / "libero_object_0" / f"eval_episode_{ep}.mp4"))
        rows = np.flatnonzero(episodes == ep)
        assert len(rows) == math.ceil(frames / n_action_steps)
        assert ds[S.ROLLOUT].values[rows].tolist() == list(range(len(rows)))
        assert ds[S.ENV_STEP].values[rows].tolist() == [r * n_action_steps for r in range(len(rows))]


def test_rows_sum_to_one_over_valid_keys(batched_run):
    import xarray as xr

    out, _ = batched_run
    ds = xr.open_zarr(out / "attention.zarr")
    att = ds[S.ATTENTION].values.astype(np.float64)  # (I, D, L, H, Q, K), a few MB here
    valid = ds[S.KEY_VALID].values[:, None, None, None, None, :]
    n_valid = ds[S.KEY_VALID].values.sum(axis=1)[:, None, None, None, None]  # (I, 1, 1, 1, 1)
    sums = np.where(valid, att, 0).sum(-1)  # (I, D, L, H, Q)
    assert np.all(np.abs(sums - 1) <= n_valid * S.MAX_ABS_ERROR["uint16"] + 1e-6)
    assert np.all(np.where(valid, 0, att) == 0)  # masked keys (empty camera, padding) exactly 0
    region = ds[S.KEY_REGION].values
    assert not ds[S.KEY_VALID].values[:, region == "empty_camera_0"].any()


def test_episode_records_match_lerobots_eval_info(batched_run, monkeypatch):
    if "LIBERO_CONFIG_PATH" not in os.environ:  # hf-libero prompts on stdin without its config
        monkeypatch.setenv("LIBERO_CONFIG_PATH", str(Path(sys.prefix) / "libero-config"))
    check_records_match_eval_info(batched_run[0], RECORDED, N_EPISODES)


def check_records_match_eval_info(out: Path, recorded: list[int], n_episodes: int) -> None:
    import xarray as xr
    from libero.libero import benchmark

    info = json.loads((out / "eval_info.json").read_text())
    (task,) = info["per_task"]
    ds = xr.open_zarr(out / "attention.zarr")
    order = np.argsort(ds[S.EPISODE_INDEX].values)
    assert len(task["metrics"]["successes"]) == n_episodes
    assert ds[S.EPISODE_INDEX].values[order].tolist() == recorded
    assert ds[S.SUCCESS].values[order].tolist() == [task["metrics"]["successes"][e] for e in recorded]
    assert set(ds[S.TASK_GROUP].values.tolist()) == {task["task_group"]}
    assert set(ds[S.TASK_ID].values.tolist()) == {task["task_id"]}
    language = benchmark.get_benchmark_dict()["libero_object"]().get_task(0).language
    assert set(ds[S.TASK].values.tolist()) == {language}
    for ep, n in zip(ds[S.EPISODE_INDEX].values, ds[S.NUM_ENV_STEPS].values):
        frames = _video_frames(out / "videos" / "libero_object_0" / f"eval_episode_{int(ep)}.mp4")
        assert n == len(frames)


def test_env_step_is_the_video_frame_the_policy_saw(batched_run):
    check_env_step_is_video_frame(batched_run[0], RECORDED)


def check_env_step_is_video_frame(out: Path, recorded: list[int]) -> None:
    """The stored policy image (after lerobot's flip) of each inference best matches video frame env_step."""
    import torch
    import torch.nn.functional as F
    import xarray as xr

    ds = xr.open_zarr(out / "attention.zarr")
    images = ds[S.IMAGES].sel(camera="image").values  # agentview, as the policy saw it (224x224)
    checked = 0
    for ep in recorded:
        frames = _video_frames(out / "videos" / "libero_object_0" / f"eval_episode_{ep}.mp4")
        resized = F.interpolate(
            torch.from_numpy(frames).permute(0, 3, 1, 2).float(),
            size=images.shape[1:3],
            mode="bilinear",
            antialias=True,
            align_corners=False,
        ).permute(0, 2, 3, 1).numpy()
        for row in np.flatnonzero(ds[S.EPISODE].values == ep):
            step = int(ds[S.ENV_STEP].values[row])
            err = np.abs(resized - images[row].astype(np.float32)).mean(axis=(1, 2, 3))
            assert err.argmin() == step, f"episode {ep}: image at env_step {step} best matches frame {err.argmin()}"
            assert err[step] < 8.0  # codec + resize error only (0..255 scale)
            checked += 1
    assert checked == len(ds[S.EPISODE].values)


def test_open_attention_and_status(batched_run):
    from attnstore.store.open import RUN_ATTR, STATUS_ATTR, open_attention

    out, _ = batched_run
    ds = open_attention(out / "attention.zarr")
    assert ds.attrs[STATUS_ATTR] == "closed"
    run = ds.attrs[RUN_ATTR]
    assert run["tasks"] == [{"task_group": "libero_object", "task_id": 0, "first_episode": 0, "n_episodes": 3}]
    assert run["n_action_steps"] == 10 and run["tiny_policy"] is True
    assert ds.attention.sel(episode=2, rollout=1).shape[:2] == (10, 2)
    assert run["attention"]["episodes"] == RECORDED


def test_export_pt_on_the_evaluation_store(batched_run, tmp_path):
    export = pytest.importorskip("attnstore.legacy.export_pt", reason="export-pt not built in this checkout")
    import torch

    out, _ = batched_run
    files = export.export_pt(out / "attention.zarr", tmp_path / "pt", progress=False)
    assert len(files) == len(RECORDED)
    data = torch.load(files[0], weights_only=True)
    first = data["rollout_steps"][0]["attention_maps"][9]["attention_weights"][1]
    assert tuple(first.shape) == (1, 8, 50, 1018)
    assert data["rollout_steps"][1]["rollout_step"] == 10


# ---- async vector envs (lerobot's freeze-after-end wrapper instead of auto-reset) ----------------------
def test_async_envs_record_each_episode(tiny_checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cmd = _eval_command(
        tiny_checkpoint, out, "--eval.n_episodes=2", "--eval.batch_size=2", "--eval.use_async_envs=true",
        "--env.episode_length=12",
    )
    cmd = [a for a in cmd if a != "--eval.use_async_envs=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if "LIBERO_CONFIG_PATH" not in os.environ:
        monkeypatch.setenv("LIBERO_CONFIG_PATH", str(Path(sys.prefix) / "libero-config"))
    check_rows_per_inference(out, tiny_checkpoint, [0, 1])
    check_records_match_eval_info(out, [0, 1], 2)
    check_env_step_is_video_frame(out, [0, 1])


# ---- interrupted run ------------------------------------------------------------------------------
def test_sigint_keeps_committed_inferences_readable(tiny_checkpoint, tmp_path):
    from attnstore.store.open import STATUS_ATTR, open_attention

    out = tmp_path / "run"
    store = out / "attention.zarr"
    cmd = _eval_command(
        tiny_checkpoint, out, "--eval.n_episodes=1", "--eval.batch_size=1", "--env.episode_length=200"
    )
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        deadline = time.monotonic() + 300
        rows = 0
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(2)
            try:
                rows = len(open_attention(store)[S.EPISODE])
            except Exception:  # noqa: BLE001 - not created yet
                rows = 0
            if rows >= 2:
                break
        assert rows >= 2, "the run never committed two inferences"
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-2000:]
    assert "attnstore: interrupted; everything committed so far stays readable" in stderr
    ds = open_attention(store)
    assert ds.attrs[STATUS_ATTR] == "interrupted"
    assert len(ds[S.EPISODE]) >= rows
    assert ds[S.ENV_STEP].values.tolist() == [10 * r for r in range(len(ds[S.EPISODE]))]
    assert ds.sizes.get(S.EPISODE_INDEX, 0) == 0  # the episode never finished: no record
    assert np.isfinite(ds.attention.isel(inference=-1).values).all()
    assert not (out / "eval_info.json").exists()
    report = subprocess.run(
        [sys.executable, "-c", "import sys; from attnstore.cli import main; sys.exit(main())", "inspect", str(store)],
        capture_output=True, text=True, timeout=120,
    )
    assert report.returncode == 0, report.stderr
    assert "0 complete, 1 incomplete" in report.stdout
