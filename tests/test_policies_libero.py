"""End to end: ``attnstore eval`` on real LIBERO (libero_object task 0) with a tiny Pi0 and a tiny SmolVLA.

One short episode per policy (20 env steps at 128x128, one env), checked against references the code under
test does not produce: lerobot's own eval_info.json, the mp4 video lerobot wrote (decoded with PyAV),
LIBERO's task text and the checkpoint's n_action_steps (the checks of tests/test_eval_libero.py), plus each
policy's own key layout (Pi0's state token; SmolVLA's state token and its self/cross layers).
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from attnstore import schema as S

pytestmark = [pytest.mark.libero, pytest.mark.lerobot]

EPISODE_LENGTH = 20
OBS = 128


def _runner_reads_num_inference_steps() -> bool:
    """attnstore eval's pre-flight check read ``policy.num_inference_steps`` (Pi0.5/Pi0 only) until it
    asked the checkpoint (``Checkpoint.num_denoise_steps``); SmolVLA's config calls it ``num_steps``."""
    from attnstore.evaluation import runner

    return "policy.num_inference_steps" in inspect.getsource(runner._check_config)


@pytest.fixture(scope="module", params=["pi0", "smolvla"])
def policy_run(request, tmp_path_factory):
    kind = request.param
    if kind == "smolvla":
        pytest.importorskip("num2words", reason="SmolVLA's processor needs lerobot[smolvla] (num2words)")
        if _runner_reads_num_inference_steps():
            pytest.skip("evaluation/runner.py _check_config still reads policy.num_inference_steps "
                        "(SmolVLA: num_steps); it should ask checkpoint.num_denoise_steps(policy)")
    from attnstore.capture.tiny import make_tiny_policy

    ckpt = make_tiny_policy(tmp_path_factory.mktemp("tiny") / f"tiny_{kind}", policy_type=kind)
    out = tmp_path_factory.mktemp("eval") / kind
    cmd = [
        sys.executable, "-c", "import sys; from attnstore.cli import main; sys.exit(main())", "eval",
        f"--policy.path={ckpt}", "--env.type=libero", "--env.task=libero_object", "--env.task_ids=[0]",
        f"--env.observation_height={OBS}", f"--env.observation_width={OBS}", "--eval.use_async_envs=false",
        "--eval.n_episodes=1", "--eval.batch_size=1", f"--env.episode_length={EPISODE_LENGTH}",
        "--attention.layers=all", f"--output_dir={out}",
    ]
    env = dict(os.environ)
    env.pop("HF_HUB_OFFLINE", None)  # attnstore eval goes offline by itself for a tiny policy
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return kind, ckpt, out, proc.stdout


def test_store_follows_lerobots_own_outputs(policy_run, monkeypatch):
    from test_eval_libero import check_env_step_is_video_frame, check_records_match_eval_info, check_rows_per_inference

    kind, ckpt, out, stdout = policy_run
    assert "episodes recorded  1 of 1" in stdout and str(out / "attention.zarr") in stdout
    if "LIBERO_CONFIG_PATH" not in os.environ:
        monkeypatch.setenv("LIBERO_CONFIG_PATH", str(Path(sys.prefix) / "libero-config"))
    check_rows_per_inference(out, ckpt, [0])
    check_records_match_eval_info(out, [0], 1)
    check_env_step_is_video_frame(out, [0])


def test_policy_layout_rows_and_masks(policy_run):
    from attnstore.store.open import RUN_ATTR, open_attention

    kind, _, out, _ = policy_run
    ds = open_attention(out / "attention.zarr")
    assert ds.attrs[RUN_ATTR]["policy_type"] == kind
    region = ds[S.KEY_REGION].values
    assert (region == "state").sum() == 1 and np.flatnonzero(region == "state")[0] == np.flatnonzero(
        region == "action")[0] - 1 - (region == "padding").sum()
    if kind == "smolvla":
        assert ds["layer_kind"].values.tolist() == ["self", "cross", "self", "cross"]
        assert (region == "image").sum() == 64 and ds[S.IMAGES].shape[2:4] == (512, 512)
    else:
        assert "layer_kind" not in ds.coords and (region == "image").sum() == 256
    att = ds[S.ATTENTION].values.astype(np.float64)
    valid = ds[S.KEY_VALID].values[:, None, None, None, None, :]
    n_valid = ds[S.KEY_VALID].values.sum(axis=1)[:, None, None, None, None]
    sums = np.where(valid, att, 0).sum(-1)
    assert np.all(np.abs(sums - 1) <= n_valid * S.MAX_ABS_ERROR["uint16"] + 1e-6)  # rows sum to 1
    assert np.all(np.where(valid, 0, att) == 0)  # masked keys exactly 0
    assert not ds[S.KEY_VALID].values[:, region == "empty_camera_0"].any()
