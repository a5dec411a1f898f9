"""``attnstore eval``: lerobot's own evaluation, with the attention recorder attached.

Nothing of lerobot's eval loop is copied. :func:`run_eval` parses lerobot's ``EvalPipelineConfig``
with lerobot's parser, checks everything that can be checked before a simulation starts, then calls
lerobot's ``eval_main`` while three of its module globals are wrapped:

* ``make_env``: each task's vector env gets an :class:`~attnstore.evaluation.tracking.EpisodeTracker`
  (episode numbers, done flags -> ``recorder.set_active``, episode records -> the writer);
* ``make_policy``: a tiny checkpoint is rebuilt tiny and every checkpoint's weights are checked
  against its model (both by :class:`~attnstore.capture.checkpoint.Checkpoint`, as ``load_policy`` does);
* ``make_pre_post_processors``: a tiny checkpoint's tokenizer override is added, and the recorder is
  attached once the preprocessor (and so the tokenizer) exists, before the first rollout.

The wrappers are removed on exit. lerobot still writes eval_info.json and the videos itself.

The checks before any simulation are in :mod:`attnstore.evaluation.checks` (the disk budget among them:
the expected bytes per episode of a big capture are printed before the first episode, and a run that clearly
does not fit is refused); the session that joins envs, policy, recorder and writer (and the progress bar) in
:mod:`attnstore.evaluation.session`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from attnstore.evaluation.capture_writer import CaptureWriter
from attnstore.evaluation.checks import (
    check_config,
    check_disk,
    make_writer,
    parse_lerobot_config,
    resolve_policy_arg,
    run_info,
)
from attnstore.evaluation.config import parse_attention_args, split_attention_args
from attnstore.evaluation.libero_env import apply_runtime_defaults
from attnstore.evaluation.session import CaptureSession, make_recorder
from attnstore.evaluation.shutdown import EvalInterrupted, InterruptGuard

__all__ = ["CaptureSession", "EvalResult", "make_recorder", "parse_lerobot_config", "run_eval"]
_check_config = check_config  # the name tests and older code read


@dataclass
class EvalResult:
    """Where an evaluation put everything, and what it recorded."""

    output_dir: Path
    eval_info: Path
    videos_dir: Path
    store: Path
    episodes_run: int
    episodes_recorded: int
    inferences: int
    attention_bytes: int  # float32 bytes of attention handed to the writer
    store_bytes: int
    write_mb_per_s: float
    pc_success: float
    wall_s: float
    capture_stopped: str | None = None  # why the capture stopped early (the store is then interrupted)
    writer_wait_s: float = 0.0  # time the evaluation was blocked handing rows to the writer (it was behind)

    def summary(self) -> str:
        videos = sorted(self.videos_dir.rglob("*.mp4")) if self.videos_dir.is_dir() else []
        stored = (
            f"{self.store}  ({self.store_bytes / 1e6:.1f} MB on disk)"
            if self.episodes_recorded or self.inferences
            else f"{self.store}  (not written: no episode was recorded)"
        )
        if self.capture_stopped:
            stored += "  INTERRUPTED: capture stopped early (see 'attnstore inspect')"
        return "\n".join(
            [
                f"attnstore eval: done in {self.wall_s:.1f} s",
                f"  eval_info.json     {self.eval_info}",
                f"  videos             {self.videos_dir}  ({len(videos)} mp4)",
                f"  attention store    {stored}",
                f"  episodes recorded  {self.episodes_recorded} of {self.episodes_run} run",
                f"  inferences         {self.inferences}",
                f"  attention written  {self.attention_bytes / 1e6:.1f} MB (float32) at "
                f"{self.write_mb_per_s:.0f} MB/s (writer thread); waited on the writer {self.writer_wait_s:.1f} s",
                f"  success rate       {self.pc_success:.1f}%",
                f"  inspect it with:   attnstore inspect {self.store}",
            ]
        )


def run_eval(argv: Sequence[str]) -> EvalResult:
    """Run lerobot-eval with ``argv`` (lerobot's flags plus ``--attention.*``), capturing attention.

    Ctrl-C ends the run within seconds whatever lerobot is doing (:mod:`attnstore.evaluation.shutdown`):
    the store is closed as ``interrupted``, one line says what was kept, and :class:`EvalInterrupted`
    is raised. A writer failure (full disk) stops the capture only: lerobot's evaluation finishes.
    """
    with InterruptGuard() as guard:
        try:
            return _run_eval(argv, guard)
        except KeyboardInterrupt as exc:
            if isinstance(exc, EvalInterrupted):
                raise
            raise guard.interrupt() from None


def _run_eval(argv: Sequence[str], guard: InterruptGuard) -> EvalResult:
    attention_args, lerobot_args = split_attention_args(argv)
    attention = parse_attention_args(attention_args)
    lerobot_args, checkpoint = resolve_policy_arg(lerobot_args)
    apply_runtime_defaults(tiny_policy=checkpoint.tiny)

    cfg = parse_lerobot_config(lerobot_args)
    n_tasks = check_config(cfg, attention, checkpoint)
    store_path = attention.store_path(cfg.output_dir)
    run = run_info(cfg, attention, argv, checkpoint)
    store_writer = make_writer(store_path, attention, run)  # refuses an existing store; creates nothing yet
    check_disk(cfg, attention, checkpoint, store_path, n_tasks)  # prints the size of a big capture; may refuse
    writer = CaptureWriter(store_writer, halted=lambda: guard.interrupted, shield=guard.deferred)
    session = CaptureSession(attention, writer, n_episodes=cfg.eval.n_episodes, checkpoint=checkpoint, run=run,
                             async_envs=bool(cfg.eval.use_async_envs))
    store_writer.on_progress = session.show_writer  # the progress bar shows the queue, MB/s and waits
    guard.watch(lambda: _close_interrupted(writer, store_path, Path(cfg.output_dir) / "eval_info.json"))

    from lerobot.scripts import lerobot_eval
    from lerobot.utils.import_utils import register_third_party_plugins
    from lerobot.utils.utils import init_logging

    init_logging()
    register_third_party_plugins()
    start = time.perf_counter()
    try:
        with session.patch_lerobot(lerobot_eval):
            lerobot_eval.eval_main(cfg)
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt) or guard.interrupted:
            raise guard.interrupt() from None  # closes the store, says what was kept
        writer.close(status="interrupted", reason=f"the evaluation failed: {type(exc).__name__}: {exc}")
        raise
    finally:
        session.close_progress()
    stats = writer.close()
    output_dir = Path(cfg.output_dir)
    info_path = output_dir / "eval_info.json"
    pc_success = float("nan")
    if info_path.is_file():
        pc_success = float(json.loads(info_path.read_text())["overall"]["pc_success"])
    return EvalResult(
        output_dir=output_dir,
        eval_info=info_path,
        videos_dir=output_dir / "videos",
        store=store_path,
        episodes_run=session.episodes_run,
        episodes_recorded=session.episodes_recorded,
        inferences=stats.rows,
        attention_bytes=stats.attention_bytes,
        store_bytes=stats.store_bytes or _store_bytes(store_path),
        write_mb_per_s=stats.attention_mb_per_s,
        pc_success=pc_success,
        wall_s=time.perf_counter() - start,
        capture_stopped=writer.failure,
        writer_wait_s=stats.wait_seconds,
    )


def _close_interrupted(writer: CaptureWriter, store: Path, eval_info: Path) -> str:
    """Ctrl-C: close the store as interrupted (unless it was closed already); the one line saying what was kept."""
    stats = writer.close(status="interrupted", reason="interrupted by Ctrl-C (SIGINT)")
    lerobot = "lerobot's eval_info.json is written" if eval_info.is_file() else "lerobot wrote no eval_info.json"
    if writer.spec is None:
        return f"attnstore: interrupted before the first inference: no attention store was written; {lerobot}"
    state = "complete (closed)" if writer.final_status == "closed" else f"closed as {writer.final_status}"
    if writer.failure:
        state += f" (capture had stopped: {writer.failure})"
    return (
        f"attnstore: interrupted; everything committed so far stays readable: {store} keeps {stats.rows} "
        f"committed inference(s) and {stats.episodes} finished episode(s), {state}; {lerobot}"
    )


def _store_bytes(path: Path) -> int:
    from attnstore.store.writer import directory_bytes

    return directory_bytes(path) if path.is_dir() else 0
