"""A reader beside a live run: polling a store while a real LIBERO evaluation writes it.

Every ~0.5 s the test opens the store with ``open_attention`` and with plain ``xr.open_zarr`` (the
writer rewrites the consolidated metadata after every commit, :mod:`attnstore.store.snapshot`). Every
poll must open, and show a prefix of the final rows (episode, rollout, env step) whose values (attention,
actions, key_valid) equal the final store's, and a prefix of the final per-episode table.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from attnstore import schema as S

pytestmark = [pytest.mark.libero, pytest.mark.lerobot]

POLL_S = 0.5


def rows_of(ds) -> list[tuple[int, int, int]]:
    return list(zip(ds[S.EPISODE].values.tolist(), ds[S.ROLLOUT].values.tolist(), ds[S.ENV_STEP].values.tolist()))


def test_every_poll_of_a_live_store_is_a_consistent_prefix(tmp_path):
    import xarray as xr

    from attnstore.capture.checkpoint import ensure_tiny_checkpoint
    from attnstore.store.open import STATUS_ATTR, open_attention

    out = tmp_path / "run"
    store = out / "attention.zarr"
    cmd = [
        sys.executable, "-c", "import sys; from attnstore.cli import main; sys.exit(main())", "eval",
        f"--policy.path={ensure_tiny_checkpoint()}", "--env.type=libero", "--env.task=libero_object",
        "--env.task_ids=[0]", "--env.observation_height=128", "--env.observation_width=128",
        "--eval.use_async_envs=false", "--eval.n_episodes=2", "--eval.batch_size=1", "--env.episode_length=30",
        f"--output_dir={out}",
    ]
    env = dict(os.environ, MUJOCO_GL="egl", HF_HUB_OFFLINE="1")
    polls: list[dict] = []
    seen_values: dict[tuple[int, int, int], np.ndarray] = {}
    with open(tmp_path / "stderr", "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
        try:
            deadline = time.monotonic() + 900
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(POLL_S)
                if not (store / "zarr.json").exists():
                    continue
                ds = open_attention(store)  # must open at every moment
                plain = xr.open_zarr(store)  # no "conflicting sizes": the consolidated shapes agree
                rows = rows_of(ds)
                poll = {
                    "status": ds.attrs[STATUS_ATTR],
                    "rows": rows,
                    "plain_episodes": plain[S.EPISODE].values.tolist(),
                    "episodes_done": ds[S.EPISODE_INDEX].values.tolist() if S.EPISODE_INDEX in ds.variables else [],
                    "actions": ds[S.ACTIONS].values.copy(),
                    "key_valid": ds[S.KEY_VALID].values.copy(),
                }
                # each row's attention the first time it shows, and the newest row's again every time
                for i, row in enumerate(rows):
                    if row not in seen_values or i == len(rows) - 1:
                        values = ds[S.ATTENTION].isel({S.INFERENCE: i}).values
                        if row in seen_values:
                            np.testing.assert_array_equal(values, seen_values[row], err_msg=f"row {row} changed")
                        seen_values[row] = values
                polls.append(poll)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert proc.returncode == 0, (tmp_path / "stderr").read_text()[-3000:]

    final = open_attention(store)
    assert final.attrs[STATUS_ATTR] == "closed"
    final_rows = rows_of(final)
    final_actions = final[S.ACTIONS].values
    final_valid = final[S.KEY_VALID].values
    final_done = final[S.EPISODE_INDEX].values.tolist()
    assert len(final_rows) == 6 and final_done == [0, 1]

    live = [p for p in polls if p["status"] == "writing"]
    print(f"{len(polls)} polls, {len(live)} while writing; rows seen {sorted({len(p['rows']) for p in polls})}")
    assert len(live) >= 5, f"only {len(live)} polls while the run was writing"
    assert len({len(p["rows"]) for p in live}) >= 3, "the polls did not see the store grow"
    for k, poll in enumerate(polls):
        n = len(poll["rows"])
        assert poll["rows"] == final_rows[:n], f"poll {k}: rows {poll['rows']} are not a prefix"
        plain = poll["plain_episodes"]  # opened just after: the same rows, or a later commit's
        assert S.UNCOMMITTED not in plain, f"poll {k}: plain xarray shows an uncommitted row"
        assert len(plain) >= n and plain == [r[0] for r in final_rows[: len(plain)]], f"poll {k}: plain {plain}"
        np.testing.assert_array_equal(poll["actions"], final_actions[:n])
        np.testing.assert_array_equal(poll["key_valid"], final_valid[:n])
        assert poll["episodes_done"] == final_done[: len(poll["episodes_done"])]
    for row, values in seen_values.items():
        np.testing.assert_array_equal(values, final[S.ATTENTION].isel({S.INFERENCE: final_rows.index(row)}).values)
    assert len(seen_values) == len(final_rows)
