"""``attnstore eval-study``: one ``attnstore eval`` process per task (and per GPU), no coordination between them.

A LIBERO study is suites x tasks x episodes; the usual way to run it is one evaluation process per task
or per GPU. This launcher starts them (at most ``jobs`` at a time), each into
``<study>/runs/<suite>_task<id>/`` (its ``eval_info.json``, videos, ``attention.zarr`` and ``eval.log``),
with ``--policy.device`` cycling over ``devices`` when given. The processes share nothing: each writes
its own store, and ``open_study(<study>)`` reads them all while they run (committed rows only) and after.

>>> [job.name for job in plan_jobs("libero_object", [0, 3], ["--policy.path=tiny"], devices=["cuda:0", "cuda:1"])]
['libero_object_task0', 'libero_object_task3']
>>> plan_jobs("libero_object", [3], [], devices=["cuda:1"])[0].args
['--env.task=libero_object', '--env.task_ids=[3]', '--policy.device=cuda:1']
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from attnstore.errors import EvalConfigError as ConfigError

RUNS = "runs"


@dataclass
class Job:
    name: str
    args: list[str]
    process: subprocess.Popen | None = None
    started: float = 0.0
    seconds: float = 0.0
    returncode: int | None = None
    log: Path | None = field(default=None)


def plan_jobs(suite: str, task_ids: Sequence[int], args: Sequence[str], devices: Sequence[str] = ()) -> list[Job]:
    """One job per task id; ``--policy.device`` cycles over ``devices``."""
    jobs = []
    for i, task in enumerate(task_ids):
        extra = [f"--policy.device={devices[i % len(devices)]}"] if devices else []
        jobs.append(Job(f"{suite}_task{task}", [f"--env.task={suite}", f"--env.task_ids=[{task}]", *args, *extra]))
    return jobs


def run_study(study: str | os.PathLike[str], suite: str, task_ids: Sequence[int], args: Sequence[str], *,
              jobs: int = 1, devices: Sequence[str] = (), echo=print) -> list[Job]:
    """Run the jobs, ``jobs`` at a time; returns them with their return codes. Ctrl-C ends them all."""
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    for flag in ("--output_dir", "--env.task=", "--env.task_ids", "--attention.store"):
        if any(a.startswith(flag) for a in args):
            raise ConfigError(f"eval-study sets {flag.rstrip('=')} per job itself: remove it (runs go to <study>/runs/<name>/)")
    root = Path(study) / RUNS
    planned = plan_jobs(suite, task_ids, args, devices)
    for job in planned:
        out = root / job.name
        if (out / "attention.zarr").exists() and "--attention.overwrite=true" not in args:
            raise ConfigError(f"{out} already holds a run: choose another --study or pass --attention.overwrite=true")
    waiting, running, done = list(planned), [], []
    try:
        while waiting or running:
            while waiting and len(running) < jobs:
                job = waiting.pop(0)
                _start(job, root / job.name)
                running.append(job)
                echo(f"attnstore eval-study: started {job.name} (pid {job.process.pid}, log {job.log})")
            time.sleep(0.5)
            for job in [j for j in running if j.process.poll() is not None]:
                running.remove(job)
                job.returncode, job.seconds = job.process.returncode, time.monotonic() - job.started
                done.append(job)
                state = "done" if job.returncode == 0 else f"FAILED (exit {job.returncode}, see {job.log})"
                echo(f"attnstore eval-study: {job.name} {state} in {job.seconds:.0f} s")
    except KeyboardInterrupt:
        for job in running:
            job.process.send_signal(signal.SIGINT)
        for job in running:
            try:
                job.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                job.process.kill()
        raise
    return done


def _start(job: Job, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    job.log = out / "eval.log"
    log = open(job.log, "w")  # noqa: SIM115 - the child owns it until it exits
    command = [sys.executable, "-c", "import sys; from attnstore.cli import main; sys.exit(main())",
               "eval", *job.args, f"--output_dir={out}"]
    job.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    job.started = time.monotonic()
