"""``attnstore eval-study`` on real LIBERO: one process per task, two at once, read by open_study while they
run and after. References: lerobot's own eval_info.json of each run and the env steps it ran."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from attnstore import schema as S

pytestmark = [pytest.mark.libero, pytest.mark.lerobot]

STEPS = 30  # env steps per episode: 3 inferences at n_action_steps 10


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from attnstore.capture.tiny import make_tiny_policy

    return make_tiny_policy(tmp_path_factory.mktemp("tiny") / "tiny_pi05")


def test_eval_study_runs_a_process_per_task_and_open_study_reads_them(tiny_checkpoint, tmp_path):
    from attnstore import open_study

    study = tmp_path / "study"
    cmd = [sys.executable, "-c", "import sys; from attnstore.cli import main; sys.exit(main())", "eval-study",
           f"--study={study}", "--suite=libero_object", "--task-ids", "0", "1", "--jobs=2",
           f"--policy.path={tiny_checkpoint}", "--env.type=libero", "--eval.n_episodes=1", "--eval.batch_size=1",
           f"--env.episode_length={STEPS}", "--env.observation_height=128", "--env.observation_width=128",
           "--eval.use_async_envs=false"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    polls = []
    try:
        deadline = time.monotonic() + 900
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(3)
            stores = list(study.glob("runs/*/attention.zarr/zarr.json"))
            if stores:
                try:
                    ds = open_study(study)
                except Exception as exc:  # a run not created yet is not a store yet: only stores are read
                    pytest.fail(f"open_study during the runs: {exc}")
                polls.append(ds.sizes[S.INFERENCE])
                assert np.isfinite(ds.attention.values).all()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-2000:] + err[-2000:]
    assert "2 of 2 runs done" in out
    ds = open_study(study)
    assert sorted(set(ds.run.values.tolist())) == ["libero_object_task0", "libero_object_task1"]
    for task in (0, 1):
        run = f"libero_object_task{task}"
        info = json.loads((study / "runs" / run / "eval_info.json").read_text())
        assert (study / "runs" / run / "eval.log").is_file()
        assert ds.sel(run=run).sizes[S.INFERENCE] == STEPS // 10
        assert ds.task_key.sel(run=run).values.tolist() == [f"libero_object_{task}"] * (STEPS // 10)
        successes = info["per_task"][0]["metrics"]["successes"] if "per_task" in info else None
        if successes is not None:
            assert ds.outcome.sel(run=run).values[0] == ("success" if successes[0] else "failure")
    assert polls == sorted(polls)
