"""Ctrl-C during a real LIBERO ``attnstore eval`` at many moments: the run always ends in bounded time.

Each trial starts an evaluation (tiny Pi0.5, libero_object task 0, short episodes) in its own session and
sends SIGINT to the whole process group, as a terminal's Ctrl-C does, at one moment: during startup
(imports), while lerobot builds the envs, during the first inference, mid-episode, during the env reset
between episodes (where LIBERO's reset swallows the interrupt and spins, see
``attnstore/evaluation/shutdown.py``), twice in a row; sync (B=1) and async (B=2, worker processes) envs.
Every trial must end within :data:`BOUND_S` with exit code 130, one ``attnstore:`` line on stderr and no
traceback, no process of the session left (async workers ended), and a store that is ``interrupted`` with
every committed row readable (or, before the first inference, no store).

To keep it short, most trials are forked from one driver process that has imported torch, lerobot and
LIBERO already (each trial costs a fork, not an interpreter start; the child runs the real CLI ``main``);
two trials start a fresh interpreter as a user does (the startup one interrupts its imports).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from attnstore import schema as S

LIBERO = [pytest.mark.libero, pytest.mark.lerobot]

BOUND_S = 15.0  # Ctrl-C -> process gone
EPISODE_LENGTH = 20
OBS = 128

DRIVER = textwrap.dedent(
    r"""
    import json, os, signal, sys, threading, traceback
    import torch  # noqa: F401 - everything heavy is imported once, before any fork
    from lerobot.scripts import lerobot_eval  # noqa: F401
    from libero.libero import benchmark  # noqa: F401
    import attnstore.cli, attnstore.evaluation.runner  # noqa: F401
    from attnstore.cli import main

    assert threading.active_count() == 1, threading.enumerate()  # forking is safe: no thread yet
    print("ready", flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            os.setsid()  # its own process group: the test sends the group a Ctrl-C
            for fd, name in ((1, job["stdout"]), (2, job["stderr"])):
                os.dup2(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            code = 1
            try:
                code = main(job["argv"])
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(f"pid {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"exit {os.waitstatus_to_exitcode(status)}", flush=True)
    """
)


@dataclass
class Trial:
    name: str
    async_envs: bool = False
    fresh: bool = False  # a new interpreter instead of a fork of the driver
    signals: int = 1
    started: float = 0.0
    interrupted: float = 0.0
    exit_code: int | None = None
    exit_s: float = float("nan")
    stderr: str = ""
    notes: list[str] = field(default_factory=list)


def eval_argv(checkpoint: Path, out: Path, async_envs: bool) -> list[str]:
    batch, episodes = (2, 4) if async_envs else (1, 2)
    return [
        "eval",
        f"--policy.path={checkpoint}",
        "--env.type=libero",
        "--env.task=libero_object",
        "--env.task_ids=[0]",
        f"--env.observation_height={OBS}",
        f"--env.observation_width={OBS}",
        f"--eval.use_async_envs={'true' if async_envs else 'false'}",
        f"--eval.n_episodes={episodes}",
        f"--eval.batch_size={batch}",
        f"--env.episode_length={EPISODE_LENGTH}",
        f"--output_dir={out}",
    ]


def child_env() -> dict[str, str]:
    env = dict(os.environ, MUJOCO_GL="egl", HF_HUB_OFFLINE="1")
    env.setdefault("LIBERO_CONFIG_PATH", str(Path(sys.prefix) / "libero-config"))
    return env


def committed_rows(store: Path) -> int:
    """Rows the readers' snapshot shows (root zarr.json), -1 before the store is in place."""
    try:
        root = json.loads((store / "zarr.json").read_text())
        return int(root["consolidated_metadata"]["metadata"][S.EPISODE]["shape"][0])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def session_processes(sid: int) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid=,sid=,args="], capture_output=True, text=True).stdout
    return [line.strip() for line in out.splitlines() if line.split()[1:2] == [str(sid)]]


class Runner:
    """Starts trials (forked from the driver, or fresh) and waits for them."""

    def __init__(self, checkpoint: Path, work: Path) -> None:
        self.checkpoint, self.work = checkpoint, work
        self.driver = subprocess.Popen(
            [sys.executable, "-c", DRIVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env=child_env(), start_new_session=True,
        )
        assert self.driver.stdout.readline().strip() == "ready"
        self.proc: subprocess.Popen | None = None

    def start(self, trial: Trial) -> tuple[int, Path, Path]:
        out = self.work / trial.name
        err = self.work / f"{trial.name}.stderr"
        argv = eval_argv(self.checkpoint, out, trial.async_envs)
        err.touch()
        trial.started = time.monotonic()
        if trial.fresh:
            cmd = [sys.executable, "-c", "import sys; from attnstore.cli import main; sys.exit(main())", *argv]
            with open(err, "w") as stderr, open(self.work / f"{trial.name}.stdout", "w") as stdout:
                self.proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL,
                                             env=child_env(), start_new_session=True)
            return self.proc.pid, out, err
        job = {"argv": argv, "stderr": str(err), "stdout": str(self.work / f"{trial.name}.stdout")}
        self.driver.stdin.write(json.dumps(job) + "\n")
        self.driver.stdin.flush()
        line = self.driver.stdout.readline().split()
        assert line[0] == "pid", line
        return int(line[1]), out, err

    def wait(self, trial: Trial, timeout: float) -> int | None:
        if trial.fresh:
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                return None
        import select

        ready, _, _ = select.select([self.driver.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.driver.stdout.readline().split()
        assert line[0] == "exit", line
        return int(line[1])

    def close(self) -> None:
        self.driver.stdin.close()
        try:
            self.driver.wait(30)
        except subprocess.TimeoutExpired:
            self.driver.kill()


def wait_for(condition, proc_alive, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc_alive(), f"the run ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# when, in each trial, Ctrl-C is pressed: (name, async, fresh, moment, delay after it, Ctrl-Cs)
TRIALS = [
    ("sync_startup_imports", False, True, "spawned", 1.5, 1),
    ("sync_making_envs", False, False, "Making environment", 0.0, 1),
    ("sync_first_inference", False, False, "lock", 0.0, 1),
    ("sync_mid_episode", False, False, "rows>=1", 0.3, 1),
    ("sync_reset_between_episodes_a", False, False, "episode 1 ended", 0.2, 1),
    ("sync_reset_between_episodes_b", False, True, "episode 1 ended", 0.8, 1),
    ("sync_twice", False, False, "rows>=1", 0.0, 2),
    ("async_making_envs", True, False, "Making environment", 0.0, 1),
    ("async_first_inference", True, False, "lock", 0.0, 1),
    ("async_mid_episode", True, False, "rows>=2", 0.3, 1),
    ("async_reset_between_batches", True, False, "episode 1 ended", 0.5, 1),
]


@pytest.fixture(scope="module")
def trials(tmp_path_factory):
    from attnstore.capture.checkpoint import ensure_tiny_checkpoint

    checkpoint = ensure_tiny_checkpoint()  # the cached tiny Pi0.5 (`--policy.path=tiny`), shared by the suite
    work = tmp_path_factory.mktemp("interrupt")
    runner = Runner(checkpoint, work)
    done: list[Trial] = []
    try:
        for name, async_envs, fresh, moment, delay, count in TRIALS:
            trial = Trial(name, async_envs=async_envs, fresh=fresh, signals=count)
            pid, out, err = runner.start(trial)
            store = out / "attention.zarr"
            lock = store.with_name(store.name + ".lock")

            def alive(pid=pid) -> bool:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    return False
                return Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid)

            def seen(text: str, err=err) -> bool:
                return text in err.read_text(errors="replace")

            conditions = {
                "spawned": lambda: True,
                "Making environment": lambda: seen("Making environment"),
                "lock": lambda: lock.exists(),
                "rows>=1": lambda: committed_rows(store) >= 1,
                "rows>=2": lambda: committed_rows(store) >= 2,
                "episode 1 ended": lambda: seen("attnstore episodes:  25%") or seen("attnstore episodes:  50%"),
            }
            wait_for(conditions[moment], alive, 600, f"{name}: {moment}")
            time.sleep(delay)
            trial.interrupted = time.monotonic()
            for k in range(count):
                os.killpg(pid, signal.SIGINT)
                if k + 1 < count:
                    time.sleep(0.3)
            code = runner.wait(trial, BOUND_S + 30)
            trial.exit_s = time.monotonic() - trial.interrupted
            if code is None:  # hung: dump where it waits, for the failure message, then end it
                with _suppress():
                    os.killpg(pid, signal.SIGKILL)
                code = runner.wait(trial, 30)
            trial.exit_code = code
            time.sleep(0.5)
            deadline = time.monotonic() + 5
            while session_processes(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            trial.notes = session_processes(pid)
            trial.stderr = err.read_text(errors="replace")
            done.append(trial)
    finally:
        runner.close()
    summary = [{"trial": t.name, "exit": t.exit_code, "exit_s": round(t.exit_s, 2),
                "started_to_ctrl_c_s": round(t.interrupted - t.started, 1)} for t in done]
    (work / "trials.json").write_text(json.dumps(summary, indent=1))
    print("\n".join(f"{t['trial']:32s} exit {t['exit']} {t['exit_s']:5.2f} s after Ctrl-C "
                    f"({t['started_to_ctrl_c_s']} s after start)" for t in summary))
    return work, done


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].splitlines()[0]
    except (OSError, IndexError):
        return "zombie"


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return True


@pytest.mark.libero
@pytest.mark.lerobot
def test_enough_moments_were_tried(trials):
    _, done = trials
    assert len(done) >= 10
    assert {t.async_envs for t in done} == {False, True}


@pytest.mark.libero
@pytest.mark.lerobot
@pytest.mark.parametrize("index", range(len(TRIALS)), ids=[t[0] for t in TRIALS])
def test_ctrl_c_ends_the_run_cleanly(trials, index):
    from attnstore.store.open import STATUS_ATTR, open_attention, read_spec

    work, done = trials
    trial = done[index]
    tail = trial.stderr[-3000:]
    assert trial.exit_code == 130, f"{trial.name}: exit {trial.exit_code} after {trial.exit_s:.1f} s\n{tail}"
    assert trial.exit_s <= BOUND_S, f"{trial.name}: took {trial.exit_s:.1f} s"
    if trial.signals >= 2:
        assert trial.exit_s <= 5.0, f"{trial.name}: a second Ctrl-C must end it at once ({trial.exit_s:.1f} s)"
    assert "Traceback" not in trial.stderr, tail
    assert "leaked" not in trial.stderr, tail  # multiprocessing's semaphores released (async envs)
    lines = [ln for ln in trial.stderr.replace("\r", "\n").splitlines() if ln.startswith("attnstore:")]
    assert len(lines) == 1, lines
    assert lines[0].startswith("attnstore: interrupted"), lines
    assert not trial.notes, f"{trial.name}: processes left: {trial.notes}"

    store = work / trial.name / "attention.zarr"
    if not store.exists():
        assert "no attention store was written" in lines[0], lines
        return
    _, info = read_spec(store)
    ds = open_attention(store)
    assert ds.attrs[STATUS_ATTR] == "interrupted", trial.name
    assert "Ctrl-C" in info.get("status_reason", "")
    n = ds.sizes[S.INFERENCE]
    assert f"keeps {n} committed" in lines[0], lines
    if n:
        values = ds.attention.values  # every committed row reads back, whole
        assert np.isfinite(values).all()
        valid = ds[S.KEY_VALID].values[:, None, None, None, None, :]
        sums = np.where(valid, values.astype(np.float64), 0).sum(-1)
        assert np.allclose(sums, 1, atol=1e-2)
        for ep in np.unique(ds[S.EPISODE].values):
            rollouts = ds[S.ROLLOUT].values[ds[S.EPISODE].values == ep]
            assert sorted(rollouts.tolist()) == list(range(len(rollouts)))


# ---- the guard alone, without a simulation (fast) ------------------------------------------------------
GUARD_SCRIPT = textwrap.dedent(
    r"""
    import multiprocessing, sys, time
    from attnstore.evaluation.shutdown import EvalInterrupted, InterruptGuard, sigint_blocked, start_forkserver

    mode = sys.argv[1]
    try:
        with InterruptGuard() as guard:
            # closing takes a moment (as a store's close does): a worker hit by the Ctrl-C would print
            # its traceback meanwhile
            guard.watch(lambda: (time.sleep(0.5), "attnstore: interrupted; the test's store closed")[1])
            if mode == "workers":
                multiprocessing.set_start_method("forkserver")
                with sigint_blocked():  # as the runner starts lerobot's async env workers
                    start_forkserver()
                    workers = [multiprocessing.Process(target=time.sleep, args=(600,), daemon=True) for _ in range(2)]
                    for w in workers:
                        w.start()
            print("ready", flush=True)
            try:
                if mode == "finalizer":
                    class Context:  # robosuite frees its EGL contexts in __del__
                        def __del__(self):
                            time.sleep(0.2)  # Ctrl-C lands here: "Exception ignored in ...", dropped

                    while True:
                        Context()
                if mode == "swallowed":
                    while True:  # LIBERO's ControlEnv.reset: `finally: continue` discards the interrupt
                        try:
                            time.sleep(0.01)
                        finally:
                            continue
                time.sleep(600)
            except KeyboardInterrupt:
                raise guard.interrupt() from None
    except EvalInterrupted as exc:
        exc.end_process()
    """
)


@pytest.mark.parametrize(
    ("mode", "signals", "bound"),
    [("clean", 1, 2.5), ("swallowed", 1, 3.0 + 2.5), ("swallowed", 2, 2.0), ("finalizer", 1, 3.0 + 2.5),
     ("workers", 1, 3.5)],
    ids=["clean", "swallowed_interrupt", "second_ctrl_c", "interrupt_in_a_finalizer", "async_workers"],
)
def test_guard_ends_the_process_in_bounded_time(mode, signals, bound):
    from attnstore.evaluation.shutdown import GRACE_S

    assert GRACE_S <= 3.0
    proc = subprocess.Popen([sys.executable, "-c", GUARD_SCRIPT, mode], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.2)
        start = time.monotonic()
        for k in range(signals):
            os.killpg(proc.pid, signal.SIGINT)  # the whole group, as a terminal does
            if k + 1 < signals:
                time.sleep(0.2)
        proc.wait(30)
        took = time.monotonic() - start
        _, stderr = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, stderr
    assert took <= bound, f"{mode}: {took:.1f} s"
    assert stderr.strip().splitlines() == ["attnstore: interrupted; the test's store closed"], stderr
    deadline = time.monotonic() + 5
    while session_processes(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not session_processes(proc.pid)  # the workers (and the forkserver) are gone
