"""CaptureSession: joins lerobot's envs, the policy, the recorder and the writer during ``attnstore eval``.

:func:`attnstore.evaluation.runner.run_eval` wraps three module globals of lerobot's eval script with it
(:meth:`CaptureSession.patch_lerobot`): ``make_env`` (an :class:`~attnstore.evaluation.tracking.EpisodeTracker`
per task's vector env), ``make_policy`` (the checkpoint's weight check) and ``make_pre_post_processors``
(the recorder is attached once the tokenizer exists). The session also keeps the progress bar: one tick per
finished episode, with the writer's queue depth, MB/s and the time the evaluation waited on it in the postfix
(:meth:`attnstore.store.writer.WriterStats.postfix`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from attnstore.errors import CaptureError
from attnstore.evaluation.config import AttentionConfig
from attnstore.evaluation.shutdown import sigint_blocked, start_forkserver
from attnstore.evaluation.tracking import EpisodeTracker, plan_tasks
from attnstore.schema import EpisodeRecord, RunInfo, TaskPlan

if TYPE_CHECKING:
    from attnstore.capture.checkpoint import Checkpoint


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
        from attnstore.capture.tokenizer import find_tokenizer

        if self.policy is None:
            raise CaptureError("lerobot built the processors before the policy; cannot attach the recorder")
        self.recorder = make_recorder(self.policy, self.writer, self.attention, find_tokenizer(preprocessor))
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
            self.show_writer()

    # ---- the progress bar ---------------------------------------------------------------------------
    def postfix(self) -> dict[str, Any]:
        """The progress bar's postfix: success so far, inferences, recorded episodes, and the writer's queue
        depth, MB/s and time waited on it (:meth:`~attnstore.store.writer.WriterStats.postfix`)."""
        out: dict[str, Any] = {}
        if self.episodes_run:
            out["success"] = f"{100 * self.successes / self.episodes_run:.0f}%"
        out["inferences"] = getattr(self.recorder, "inferences", 0)
        out["recorded"] = self.episodes_recorded
        stats = getattr(self.writer, "stats", None)
        if stats is not None and hasattr(stats, "postfix"):
            out.update(stats.postfix(getattr(self.writer, "queue_depth", None)))
        return out

    def show_writer(self, _stats: Any = None) -> None:
        """Refresh the postfix (also the writer's ``on_progress`` hook: called from ``append`` on the
        eval's thread every few seconds and whenever the evaluation had to wait for the writer)."""
        if self._progress is not None:
            self._progress.set_postfix(self.postfix())

    def _open_progress(self, total: int) -> None:
        from tqdm import tqdm

        self._progress = tqdm(total=total, desc="attnstore episodes", unit="ep", position=0, leave=True)

    def close_progress(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None


def make_recorder(policy: Any, writer: Any, attention: AttentionConfig, tokenizer: Any = None):
    """The :class:`~attnstore.capture.recorder.AttentionRecorder` ``--attention.*`` asks for (not attached)."""
    from attnstore.capture.recorder import AttentionRecorder

    a = attention
    return AttentionRecorder(
        policy,
        writer,
        layers=a.layer_selection,
        denoise_steps=a.denoise_selection,
        prefix=a.prefix_selection,
        images=a.images,
        actions=a.actions,
        encoding=a.encoding,
        summary=a.summary,
        tokenizer=tokenizer,
    )
