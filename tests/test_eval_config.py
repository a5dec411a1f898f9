"""``attnstore eval`` settings and pre-flight checks: fast, no LIBERO simulation.

The pre-flight tests call the real CLI in-process with real lerobot config parsing and a real tiny
checkpoint; each asserts a one-line error and that nothing was written (no store, no eval_info).
The tracker test drives a real gymnasium vector env (CartPole, ragged episode ends, NEXT_STEP
autoreset like lerobot's LIBERO sync envs) and checks the tracker against the raw done flags.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from attnstore.errors import EvalConfigError
from attnstore.evaluation.config import AttentionConfig, parse_attention_args, split_attention_args
from attnstore.evaluation.libero_env import apply_runtime_defaults, successes_from_info
from attnstore.evaluation.tracking import TaskPlan, plan_tasks


# ---- AttentionConfig --------------------------------------------------------------------------
def test_defaults():
    cfg = parse_attention_args([])
    assert (cfg.layer_selection, cfg.denoise_selection, cfg.prefix_selection) == ("last:2", "all", False)
    assert (cfg.images, cfg.actions, cfg.encoding, cfg.overwrite, cfg.episodes) == (True, True, "portable", False, None)
    assert cfg.summary is True
    assert str(cfg.store_path("out/run")) == "out/run/attention.zarr"


def test_draccus_values_are_normalised():
    cfg = parse_attention_args(
        [
            "--attention.layers=[16,-1]",
            "--attention.denoise_steps=final",
            "--attention.episodes=[3,0,3]",
            "--attention.prefix=true",
            "--attention.images=false",
            "--attention.encoding=float32",
            "--attention.overwrite=true",
            "--attention.store=elsewhere/a.zarr",
            "--attention.summary=false",
        ]
    )
    assert cfg.layer_selection == (16, -1)
    assert cfg.denoise_selection == "final"
    assert cfg.episodes == [0, 3]
    assert cfg.prefix_selection is True
    assert cfg.images is False and cfg.overwrite is True and cfg.encoding == "float32" and cfg.summary is False
    assert str(cfg.store_path("ignored")) == "elsewhere/a.zarr"
    assert cfg.records(3) and not cfg.records(1)


@pytest.mark.parametrize(
    "arg, fragment",
    [
        ("--attention.layers=first", "--attention.layers=first: use all, last:N"),
        ("--attention.layers=last:0", "last:N needs a whole number N >= 1"),
        ("--attention.denoise_steps=[]", "--attention.denoise_steps=[]"),
        ("--attention.encoding=bf16", "choose one of portable, compact, analysis, float32, uint16"),
        ("--attention.episodes=[-1]", "episode indices start at 0"),
        ("--attention.store=out/attn", "name the store folder '*.zarr'"),
        ("--attention.colour=red", "unrecognized arguments: --attention.colour=red"),
        ("--attention.images=maybe", "attention.images"),
    ],
)
def test_bad_values_fail_in_one_line(arg, fragment):
    with pytest.raises(EvalConfigError) as info:
        parse_attention_args([arg])
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_split_keeps_lerobot_args_in_order():
    ours, rest = split_attention_args(
        ["--policy.path=p", "--attention.layers", "all", "--env.task=libero_object", "--attention.images=false"]
    )
    assert ours == ["--attention.layers=all", "--attention.images=false"]
    assert rest == ["--policy.path=p", "--env.task=libero_object"]


def test_programmatic_config_validates_too():
    with pytest.raises(EvalConfigError):
        AttentionConfig(prefix="sometimes")
    assert AttentionConfig(layers="all", prefix="[0, 1]").prefix_selection == (0, 1)


# ---- environment defaults -----------------------------------------------------------------------
def test_runtime_defaults_fill_only_what_is_unset(tmp_path):
    (tmp_path / "libero-config").mkdir()
    (tmp_path / "libero-config" / "config.yaml").write_text("benchmark_root: x\n")
    env = {"MUJOCO_GL": "osmesa"}
    applied = apply_runtime_defaults(tiny_policy=True, environ=env, prefix=str(tmp_path))
    assert applied == {"LIBERO_CONFIG_PATH": str(tmp_path / "libero-config"), "HF_HUB_OFFLINE": "1"}
    assert env["MUJOCO_GL"] == "osmesa"
    user = {}
    apply_runtime_defaults(tiny_policy=False, environ=user, prefix=str(tmp_path))
    assert "HF_HUB_OFFLINE" not in user  # never force offline mode on a user's hub checkpoint


def test_successes_from_gymnasium_info_layouts():
    assert successes_from_info({"is_success": np.array([True, False]), "_is_success": np.array([True, True])}, 2) == [
        True,
        False,
    ]
    assert successes_from_info({"final_info": {"is_success": np.array([False, True])}}, 2) == [False, True]


def test_task_plans_number_episodes_run_wide():
    plans = plan_tasks([("libero_object", 0), ("libero_object", 5), ("libero_goal", 1)], 4)
    assert [p.first_episode for p in plans] == [0, 4, 8]
    assert plans[1].local_index(6) == 2
    assert plans[1].video_name(6) == "libero_object_5/eval_episode_2.mp4"


def test_run_info_round_trips_and_reads_other_runs():
    from attnstore.schema import RunInfo

    plans = tuple(plan_tasks([("libero_object", 0), ("libero_object", 5)], 2))
    run = RunInfo(tool="attnstore eval", argv=("--x=1",), n_action_steps=10, task_ids=(0, 5), tasks=plans,
                  attention={"layers": "last:2"})
    data = run.to_dict()
    assert data["tasks"] == [p.to_dict() for p in plans] and data["task_ids"] == [0, 5] and data["argv"] == ["--x=1"]
    assert RunInfo.from_dict(data) == run
    assert [run.video_index(e) for e in range(5)] == [0, 1, 0, 1, 4]  # 4: outside every task, unchanged
    assert all(run.video_index(e) == plans[e // 2].local_index(e) for e in range(4))
    assert run.task_guess(3) == ("libero_object", 5)
    # a run another writer made (tests/synthetic.py's default_run): unknown keys stay readable and go back out
    other = {"policy": "synthetic", "task_group": "libero_object", "task_ids": [0, 1, 2], "n_action_steps": 10}
    info = RunInfo.from_dict(other)
    assert (info.policy, info.task_ids, info.n_action_steps, info.tasks) == ("synthetic", (0, 1, 2), 10, ())
    assert info.extra == {"task_group": "libero_object"} and info.task_guess(2) == ("libero_object", None)
    assert {k: v for k, v in info.to_dict().items() if k in other} == other


# ---- tracker on a real vector env -----------------------------------------------------------------
@pytest.mark.lerobot
def test_tracker_reports_each_env_end_once_and_deactivates_it():
    import gymnasium as gym
    from lerobot.envs.utils import NEW_ROLLOUT_OPTION

    from attnstore.evaluation.tracking import EpisodeTracker

    max_steps, num_envs = 60, 3
    env = gym.vector.SyncVectorEnv(
        [lambda: gym.make("CartPole-v1", max_episode_steps=max_steps)] * num_envs,
        autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP,
    )
    plan = TaskPlan("cartpole", 7, first_episode=10, n_episodes=5)  # 2 batches of 3; the 6th row is extra
    events: list[tuple] = []
    tracker = EpisodeTracker(
        env,
        plan,
        on_batch_start=lambda eps, counted: events.append(("start", eps.tolist(), counted.tolist())),
        on_active=lambda running: events.append(("active", running.tolist())),
        on_episode_end=lambda rec: events.append(("end", rec)),
    ).install()
    rng = np.random.default_rng(0)
    truth = {}
    for batch in range(2):  # the same calls lerobot's rollout makes, with our own done bookkeeping
        env.reset(seed=[batch * 3 + i for i in range(num_envs)], options={NEW_ROLLOUT_OPTION: True})
        done = np.zeros(num_envs, bool)
        step = 0
        while not done.all() and step < max_steps:
            _, _, term, trunc, _ = env.step(rng.integers(0, 2, num_envs))
            for i in np.flatnonzero((term | trunc) & ~done):
                truth[plan.first_episode + batch * num_envs + int(i)] = step + 1
            done |= term | trunc
            step += 1
    tracker.uninstall()
    assert "step" not in vars(env) and "reset" not in vars(env)

    starts = [e for e in events if e[0] == "start"]
    assert starts == [("start", [10, 11, 12], [True, True, True]), ("start", [13, 14, 15], [True, True, False])]
    ends = {rec.episode: rec for kind, rec in (e for e in events if e[0] == "end")}
    expected = {ep: n for ep, n in truth.items() if ep < plan.first_episode + plan.n_episodes}
    assert {ep: rec.num_env_steps for ep, rec in ends.items()} == expected
    assert len([e for e in events if e[0] == "end"]) == len(expected)  # once each, the extra row never
    assert all(rec.task_group == "cartpole" and rec.task_id == 7 and not rec.success for rec in ends.values())
    lengths = sorted(set(expected.values()))
    assert len(lengths) > 1, "episodes should end at different steps for this test to mean anything"
    # within a batch a row only ever goes from running to ended, and every counted row ends
    batch_states: list[list[list[bool]]] = []
    for event in events:
        if event[0] == "start":
            batch_states.append([event[2]])
        elif event[0] == "active":
            batch_states[-1].append(event[1])
    for states in batch_states:
        for before, after in zip(states, states[1:]):
            assert all(b or not a for b, a in zip(before, after))
        assert not any(states[-1])


# ---- pre-flight errors of the real CLI (lerobot's parser, real tiny checkpoint, no simulation) -------
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from attnstore.capture.tiny import make_tiny_policy

    return make_tiny_policy(tmp_path_factory.mktemp("tiny") / "tiny_pi05")


@pytest.fixture
def eval_cli(monkeypatch, tmp_path, capsys):
    """Run ``attnstore eval`` in-process; returns (exit code, stderr, output dir)."""
    for key in ("HF_HUB_OFFLINE", "MUJOCO_GL", "LIBERO_CONFIG_PATH"):  # the CLI sets defaults; undo after
        original = os.environ.get(key)
        monkeypatch.setenv(key, original or "")
        if original is None:
            monkeypatch.delenv(key)
    out = tmp_path / "eval"

    def run(*extra, policy=None, task="libero_object"):
        from attnstore.cli import main

        args = [
            "eval",
            f"--policy.path={policy}",
            "--env.type=libero",
            f"--env.task={task}",
            "--env.task_ids=[0]",
            "--eval.n_episodes=1",
            "--eval.batch_size=1",
            f"--output_dir={out}",
            *extra,
        ]
        code = main(args)
        return code, capsys.readouterr().err.strip().splitlines(), out

    return run


def _assert_nothing_ran(out):
    assert not (out / "eval_info.json").exists()
    assert not (out / "attention.zarr").exists()
    assert not (out / "videos").exists()


@pytest.mark.lerobot
def test_unknown_task_suite(eval_cli, tiny_checkpoint):
    code, err, out = eval_cli(policy=tiny_checkpoint, task="libero_objekt")
    assert code == 2 and len(err) == 1
    assert "unknown LIBERO task suite 'libero_objekt'" in err[0] and "libero_object" in err[0]
    _assert_nothing_ran(out)


@pytest.mark.lerobot
def test_layers_out_of_range(eval_cli, tiny_checkpoint):
    code, err, out = eval_cli("--attention.layers=[0,5]", policy=tiny_checkpoint)
    assert code == 2 and len(err) == 1
    assert "--attention.layers=[0, 5]" in err[0] and "valid 0..1" in err[0]  # the tiny expert has 2 layers
    _assert_nothing_ran(out)


@pytest.mark.lerobot
def test_missing_policy_path(eval_cli, tmp_path):
    code, err, out = eval_cli(policy=tmp_path / "no_such_checkpoint")
    assert code == 2 and len(err) == 1 and "does not exist" in err[0]
    _assert_nothing_ran(out)


@pytest.mark.lerobot
def test_policy_that_is_not_pi05(eval_cli, tiny_checkpoint, tmp_path):
    import shutil

    other = tmp_path / "act_policy"
    shutil.copytree(tiny_checkpoint, other)
    config = json.loads((other / "config.json").read_text())
    config["type"] = "act"
    (other / "config.json").write_text(json.dumps(config))
    code, err, out = eval_cli(policy=other)
    assert code == 2 and len(err) == 1 and "'act' policy" in err[0] and "pi05" in err[0]
    _assert_nothing_ran(out)


@pytest.mark.lerobot
def test_existing_store_of_another_run_is_refused(eval_cli, tiny_checkpoint, tmp_path):
    from attnstore.schema import StoreSpec, TokenLayout
    from attnstore.store.writer import AttentionWriter

    store = tmp_path / "eval" / "attention.zarr"
    spec = StoreSpec(layout=TokenLayout(("image",), (True,), num_language=4, num_action=2), layers=(0,),
                     denoise_steps=(0,), num_denoise_steps=1)
    AttentionWriter(store, spec, run={"marker": "earlier run"}).close()
    before = sorted(p.relative_to(store) for p in store.rglob("*"))

    code, err, out = eval_cli(policy=tiny_checkpoint)
    assert code == 2 and len(err) == 1
    assert "already holds an attention store" in err[0] and "--attention.overwrite=true" in err[0]
    assert sorted(p.relative_to(store) for p in store.rglob("*")) == before  # untouched
    assert not (out / "eval_info.json").exists()


# ---- what --attention.* reaches: the recorder, the disk budget, the console ---------------------------
def _attention_codecs(store) -> list[str]:
    """Codec names of the stored attention array, read from its zarr.json (not through attnstore)."""
    meta = json.loads((store / "attention" / "zarr.json").read_text())
    return [c["name"] for c in meta["codecs"]]


def _summary_arrays(store) -> list[str]:
    return sorted(p.name for p in store.iterdir() if p.name.startswith("summary") and (p / "zarr.json").is_file())


@pytest.mark.lerobot
def test_eval_recorder_takes_encoding_and_summary(tiny_checkpoint, tmp_path):
    """The recorder the eval builds (session.make_recorder) writes what --attention.encoding/summary ask for."""
    import torch

    from attnstore.capture import find_tokenizer, load_policy
    from attnstore.evaluation.session import make_recorder
    from attnstore.store.writer import AttentionWriter

    policy, pre, _ = load_policy(tiny_checkpoint)
    g = torch.Generator().manual_seed(0)
    obs = {f"observation.images.{c}": torch.randint(0, 256, (1, 3, 64, 64), generator=g).float() / 255
           for c in ("image", "image2")}
    obs["observation.state"] = torch.rand(1, 8, generator=g)
    obs["task"] = ["pick up the alphabet soup and place it in the basket"]
    stores = {}
    for name, args in (("default", []), ("compact", ["--attention.encoding=compact", "--attention.summary=false"])):
        stores[name] = tmp_path / f"{name}.zarr"
        with AttentionWriter(stores[name]) as writer:
            with make_recorder(policy, writer, parse_attention_args(args), find_tokenizer(pre)):
                policy.reset()
                policy.select_action(pre(obs))
    assert "attnstore.denoise_predict" in _attention_codecs(stores["compact"])  # compact's own codec
    assert "attnstore.denoise_predict" not in _attention_codecs(stores["default"])  # portable: blosc only
    assert _summary_arrays(stores["compact"]) == []
    assert len(_summary_arrays(stores["default"])) >= 2  # region mass and entropy at least


@pytest.fixture
def small_disk(tmp_path):
    """An 80 MiB tmpfs (a real small filesystem), or a skip saying why there is none."""
    import subprocess

    where = tmp_path / "small"
    where.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=80m", "tmpfs", str(where)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({proc.stderr.strip() or proc.returncode})")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], capture_output=True)


@pytest.mark.lerobot
def test_eval_refuses_a_disk_that_cannot_hold_the_run(eval_cli, tiny_checkpoint, small_disk):
    store = small_disk / "attention.zarr"
    # the tiny Pi0.5 stores ~33 MB of raw float32 per model run, 28 runs an episode of libero_object: one
    # episode needs tens of MB even at the best compression, three do not fit in 80 MiB
    code, err, out = eval_cli("--eval.n_episodes=3", "--attention.layers=all", f"--attention.store={store}",
                              policy=tiny_checkpoint)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("attnstore: error: not enough free disk for the attention store: 3 episodes need")
    assert "84 MB are free" in err[0] and "recording at most 1 of the 3 episodes" in err[0], err[0]
    assert "--attention.store=" in err[0]
    assert list(small_disk.iterdir()) == [] and not (out / "eval_info.json").exists()


@pytest.mark.libero
@pytest.mark.lerobot
def test_eval_writes_a_compact_store_and_reports_the_writer(tiny_checkpoint, tmp_path):
    """A real ``attnstore eval`` (subprocess, LIBERO, 1 short episode) with --attention.encoding=compact and
    --attention.summary=false: the store is compact and has no summaries; the progress bar's postfix shows
    the writer's queue and MB/s, the end summary how long the evaluation waited on it."""
    import subprocess
    import sys

    out = tmp_path / "run"
    cmd = [sys.executable, "-c", "import sys; from attnstore.cli import main; sys.exit(main())", "eval",
           f"--policy.path={tiny_checkpoint}", "--env.type=libero", "--env.task=libero_object", "--env.task_ids=[0]",
           "--env.observation_height=128", "--env.observation_width=128", "--env.episode_length=12",
           "--eval.n_episodes=1", "--eval.batch_size=1", "--eval.use_async_envs=false", f"--output_dir={out}",
           "--attention.encoding=compact", "--attention.summary=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    store = out / "attention.zarr"
    assert "attnstore.denoise_predict" in _attention_codecs(store) and _summary_arrays(store) == []
    assert json.loads((store / "attention" / "zarr.json").read_text())["attributes"]["encoding"] == "compact"
    assert "waited on the writer" in proc.stdout, proc.stdout
    bar = [ln for ln in proc.stderr.replace("\r", "\n").splitlines() if "attnstore episodes" in ln and "1/1" in ln]
    assert bar and "queue=" in bar[-1] and "writer=" in bar[-1] and "MB/s" in bar[-1], bar


def test_end_summary_says_how_long_the_eval_waited_on_the_writer(tmp_path):
    from attnstore.evaluation.runner import EvalResult

    result = EvalResult(output_dir=tmp_path, eval_info=tmp_path / "eval_info.json", videos_dir=tmp_path / "videos",
                        store=tmp_path / "attention.zarr", episodes_run=2, episodes_recorded=2, inferences=6,
                        attention_bytes=600_000_000, store_bytes=80_000_000, write_mb_per_s=300.0, pc_success=50.0,
                        wall_s=12.0, writer_wait_s=3.3)
    line = next(ln for ln in result.summary().splitlines() if "attention written" in ln)
    assert "600.0 MB (float32) at 300 MB/s" in line and line.endswith("waited on the writer 3.3 s")


def test_progress_postfix_shows_the_writer():
    from types import SimpleNamespace

    from attnstore.evaluation.session import CaptureSession
    from attnstore.store.writer import WriterStats

    stats = WriterStats(attention_bytes=2_000_000_000, busy_seconds=4.0, wait_seconds=1.5, queue_size=4)
    writer = SimpleNamespace(stats=stats, queue_depth=3, spec=None, stopped=False)
    session = CaptureSession(AttentionConfig(), writer, n_episodes=1, checkpoint=None)
    session.episodes_run, session.successes = 4, 1
    assert session.postfix() == {"success": "25%", "inferences": 0, "recorded": 0, "queue": "3/4",
                                 "writer": "500MB/s", "waited": "1.5s"}
