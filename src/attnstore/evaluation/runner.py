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
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from attnstore.errors import CaptureError, EvalConfigError, StoreError
from attnstore.evaluation.capture_writer import CaptureWriter
from attnstore.evaluation.config import AttentionConfig, parse_attention_args, split_attention_args
from attnstore.evaluation.libero_env import apply_runtime_defaults, check_libero_ready, check_libero_tasks
from attnstore.evaluation.shutdown import EvalInterrupted, InterruptGuard, sigint_blocked, start_forkserver
from attnstore.evaluation.tracking import EpisodeTracker, plan_tasks
from attnstore.schema import EpisodeRecord, RunInfo, TaskPlan

if TYPE_CHECKING:
    from attnstore.capture.checkpoint import Checkpoint


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
                f"{self.write_mb_per_s:.0f} MB/s (writer thread)",
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
    lerobot_args, checkpoint = _resolve_policy_arg(lerobot_args)
    apply_runtime_defaults(tiny_policy=checkpoint.tiny)

    cfg = parse_lerobot_config(lerobot_args)
    _check_config(cfg, attention, checkpoint)
    store_path = attention.store_path(cfg.output_dir)
    run_info = _run_info(cfg, attention, argv, checkpoint)
    writer = CaptureWriter(_make_writer(store_path, attention, run_info), halted=lambda: guard.interrupted,
                           shield=guard.deferred)
    session = CaptureSession(attention, writer, n_episodes=cfg.eval.n_episodes, checkpoint=checkpoint, run=run_info,
                             async_envs=bool(cfg.eval.use_async_envs))
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


# ---- before any simulation ------------------------------------------------------------------
def _resolve_policy_arg(args: list[str]) -> tuple[list[str], Checkpoint]:
    """Check ``--policy.path`` (a missing or non-Pi0.5 local dir fails in one line); ``tiny`` = the
    cached tiny model. Returns the args (a local path made absolute) and the resolved checkpoint."""
    from attnstore.capture import checkpoint

    value = _flag_value(args, "--policy.path")
    if value is None:
        raise EvalConfigError(
            "pass --policy.path=DIR (a Pi0.5 checkpoint directory or hub id; "
            "'attnstore make-tiny-policy DIR' builds a tiny offline one, or use --policy.path=tiny)"
        )
    ckpt = checkpoint.resolve(value)
    args = [a for a in args if not a.startswith("--policy.path=")] + [f"--policy.path={ckpt.source}"]
    return args, ckpt


def _flag_value(args: Sequence[str], flag: str) -> str | None:
    """Value of ``flag=VALUE`` (last one wins), the form lerobot's parser reads.

    >>> _flag_value(["--policy.path=a", "--x=1", "--policy.path=b"], "--policy.path")
    'b'
    """
    value = None
    for arg in args:
        if arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def parse_lerobot_config(args: Sequence[str]):
    """lerobot's ``EvalPipelineConfig`` from lerobot-eval flags, parsed by lerobot's own parser.

    lerobot reads ``sys.argv`` (also inside the config's ``__post_init__``), so it is set for the call.
    """
    from lerobot.configs import parser
    from lerobot.configs.eval import EvalPipelineConfig

    def _identity(cfg):
        return cfg

    _identity.__annotations__ = {"cfg": EvalPipelineConfig}  # lerobot's wrap reads the real class here

    saved = sys.argv
    sys.argv = ["attnstore eval", *args]
    try:
        return parser.wrap()(_identity)()
    finally:
        sys.argv = saved


def _check_config(cfg: Any, attention: AttentionConfig, checkpoint: Checkpoint) -> None:
    """Every check that can fail before lerobot builds an env: policy type, layers, task suite."""
    from attnstore.capture.checkpoint import require_pi05
    from attnstore.selection import parse_denoise_steps, parse_layers

    policy = cfg.policy
    require_pi05(policy, what="--policy.path")
    if getattr(cfg.env, "max_parallel_tasks", 1) > 1:
        raise EvalConfigError(
            "--env.max_parallel_tasks > 1 runs tasks concurrently on one policy, which the recorder "
            "cannot attribute to episodes: use --env.max_parallel_tasks=1"
        )
    depth, vlm_depth = checkpoint.depths(policy)

    def label(name: str) -> str:
        return f"--attention.{name}={getattr(attention, name)}"

    parse_layers(attention.layer_selection, depth, error=EvalConfigError, label=label("layers"))
    parse_denoise_steps(
        attention.denoise_selection, checkpoint.num_denoise_steps(policy), error=EvalConfigError,
        label=label("denoise_steps")
    )
    prefix = attention.prefix_selection
    if prefix is not False:
        parse_layers(attention.layer_selection if prefix is True else prefix, vlm_depth, what="VLM layer",
                     error=EvalConfigError, label=label("prefix"))
    if getattr(cfg.env, "type", None) == "libero":
        check_libero_ready()
        check_libero_tasks(cfg.env.task, cfg.env.task_ids)


def _make_writer(store_path: Path, attention: AttentionConfig, run: RunInfo):
    """The store's writer; refuses an existing store now, before any simulation."""
    from attnstore.store.writer import AttentionWriter

    try:
        return AttentionWriter(
            store_path, run=run.to_dict(), mode="overwrite" if attention.overwrite else "create"
        )
    except StoreError as exc:
        if attention.overwrite or not store_path.exists():
            raise
        raise StoreError(
            f"{store_path} already holds an attention store from another run: pass "
            f"--attention.overwrite=true to replace it, or a fresh --output_dir / --attention.store"
        ) from exc


def _run_info(cfg: Any, attention: AttentionConfig, argv: Sequence[str], checkpoint: Checkpoint) -> RunInfo:
    """What produced the store, kept in its root attrs (the task plans are added once the envs exist)."""
    from importlib.metadata import version

    env = cfg.env
    return RunInfo(
        tool="attnstore eval",
        argv=tuple(str(a) for a in argv),
        policy=checkpoint.source if checkpoint.local else str(cfg.policy.pretrained_path),
        policy_type=cfg.policy.type,
        tiny_policy=checkpoint.tiny,
        n_action_steps=int(cfg.policy.n_action_steps),
        env_type=getattr(env, "type", None),
        env_task=str(getattr(env, "task", "")),
        task_ids=None if getattr(env, "task_ids", None) is None else tuple(int(t) for t in env.task_ids),
        episode_length=getattr(env, "episode_length", None),
        n_episodes=int(cfg.eval.n_episodes),
        batch_size=int(cfg.eval.batch_size),
        use_async_envs=bool(cfg.eval.use_async_envs),
        seed=cfg.seed,
        output_dir=str(cfg.output_dir),
        eval_info=str(Path(cfg.output_dir) / "eval_info.json"),
        videos_dir=str(Path(cfg.output_dir) / "videos"),
        lerobot_version=version("lerobot"),
        attention={k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(attention).items()},
    )


# ---- during the evaluation --------------------------------------------------------------------
class CaptureSession:
    """Joins lerobot's envs, the policy, the recorder and the writer for one run."""

    def __init__(
        self,
        attention: AttentionConfig,
        writer: Any,
        *,
        n_episodes: int,
        checkpoint: Checkpoint,
        run: RunInfo | None = None,
        async_envs: bool = False,
    ) -> None:
        self.attention = attention
        self.async_envs = async_envs  # lerobot's workers are started from a forkserver with SIGINT blocked
        self.n_episodes = n_episodes  # per task, as lerobot's --eval.n_episodes
        self.writer = writer
        self.checkpoint = checkpoint  # its weights must match the model lerobot builds
        self.run = run if run is not None else RunInfo()
        self.plans: list[TaskPlan] = []
        self.trackers: list[EpisodeTracker] = []
        self.policy: Any = None
        self.recorder: Any = None
        self._detached = False
        self.episodes_run = 0
        self.episodes_recorded = 0
        self.successes = 0
        self._episodes = np.zeros(0, np.int64)
        self._progress: Any = None

    @contextlib.contextmanager
    def patch_lerobot(self, module: Any) -> Iterator[CaptureSession]:
        """Wrap ``make_env``, ``make_policy`` and ``make_pre_post_processors`` in lerobot's eval module."""
        originals = {
            name: getattr(module, name) for name in ("make_env", "make_policy", "make_pre_post_processors")
        }
        module.make_env = self._wrap_make_env(originals["make_env"])
        module.make_policy = self._wrap_make_policy(originals["make_policy"])
        module.make_pre_post_processors = self._wrap_processors(originals["make_pre_post_processors"])
        try:
            yield self
        finally:
            for name, fn in originals.items():
                setattr(module, name, fn)
            if self.recorder is not None:
                self.recorder.detach()
            for tracker in self.trackers:
                tracker.uninstall()

    def _wrap_make_env(self, make_env):
        def make_env_with_tracking(env_cfg, n_envs: int, *args, **kwargs):
            # env worker processes must not get the terminal's Ctrl-C (their tracebacks; the main
            # process ends them): they inherit a blocked SIGINT from here, also the forkserver that
            # lerobot's lazy async envs fork them from later
            with sigint_blocked():
                envs = make_env(env_cfg, n_envs, *args, **kwargs)
                if self.async_envs and n_envs > 1:
                    start_forkserver()
            n_episodes = self.n_episodes
            order = [(group, tid) for group, tasks in envs.items() for tid in tasks]  # eval_policy_all's order
            self.plans = plan_tasks(order, n_episodes)
            self.run = dataclasses.replace(self.run, tasks=tuple(self.plans))
            self.writer.run.update(self.run.to_dict())  # the store is created at the first inference
            for plan in self.plans:
                tracker = EpisodeTracker(
                    envs[plan.task_group][plan.task_id],
                    plan,
                    on_batch_start=self._on_batch_start,
                    on_active=self._on_active,
                    on_episode_end=self._on_episode_end,
                )
                self.trackers.append(tracker.install())
            self._open_progress(len(self.plans) * n_episodes)
            return envs

        return make_env_with_tracking

    def _wrap_make_policy(self, make_policy):
        def make_policy_checked(*args, **kwargs):
            with self.checkpoint.model_patches():
                policy = make_policy(*args, **kwargs)
            self.checkpoint.check_weights(policy)  # lerobot only warns (and keeps random weights) on a mismatch
            self.policy = policy
            return policy

        return make_policy_checked

    def _wrap_processors(self, make_pre_post_processors):
        def make_processors_and_attach(*args, **kwargs):
            # a tiny checkpoint's tokenizer lives in the checkpoint, wherever it was moved to
            kwargs["preprocessor_overrides"] = self.checkpoint.processor_overrides(kwargs.get("preprocessor_overrides"))
            preprocessor, postprocessor = make_pre_post_processors(*args, **kwargs)
            self._attach_recorder(preprocessor)
            return preprocessor, postprocessor

        return make_processors_and_attach

    def _attach_recorder(self, preprocessor: Any) -> None:
        from attnstore.capture.recorder import AttentionRecorder
        from attnstore.capture.tokenizer import find_tokenizer

        if self.policy is None:
            raise CaptureError("lerobot built the processors before the policy; cannot attach the recorder")
        a = self.attention
        self.recorder = AttentionRecorder(
            self.policy,
            self.writer,
            layers=a.layer_selection,
            denoise_steps=a.denoise_selection,
            prefix=a.prefix_selection,
            images=a.images,
            actions=a.actions,
            tokenizer=find_tokenizer(preprocessor),
        )
        self.recorder.attach()

    # ---- tracker callbacks (outside the policy's calls) -------------------------------------------
    def _keep(self, episodes: np.ndarray) -> np.ndarray:
        return np.array([self.attention.records(int(e)) for e in episodes], bool)

    def _capturing(self) -> bool:
        """False once the writer stopped (a failure, Ctrl-C): the recorder is detached here, between
        two policy calls, and lerobot's evaluation goes on without it."""
        if self.recorder is None or self._detached:
            return False
        if getattr(self.writer, "stopped", False):
            self.recorder.detach()
            self._detached = True
            return False
        return True

    def _on_batch_start(self, episodes: np.ndarray, counted: np.ndarray) -> None:
        self._episodes = episodes
        if self._capturing():
            self.recorder.set_episodes(episodes)
            self.recorder.set_active(counted & self._keep(episodes))

    def _on_active(self, running: np.ndarray) -> None:
        if self._capturing():
            self.recorder.set_active(running & self._keep(self._episodes))

    def _on_episode_end(self, record: EpisodeRecord) -> None:
        self.episodes_run += 1
        self.successes += int(record.success)
        if getattr(self.writer, "stopped", False):
            pass  # nothing is recorded any more
        elif self.attention.records(record.episode) and self.writer.spec is not None:
            self.writer.end_episode(record)
            self.episodes_recorded += 1
        if self._progress is not None:
            self._progress.update(1)
            self._progress.set_postfix(
                success=f"{100 * self.successes / self.episodes_run:.0f}%",
                inferences=getattr(self.recorder, "inferences", 0),
                recorded=self.episodes_recorded,
            )

    def _open_progress(self, total: int) -> None:
        from tqdm import tqdm

        self._progress = tqdm(total=total, desc="attnstore episodes", unit="ep", position=0, leave=True)

    def close_progress(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None
