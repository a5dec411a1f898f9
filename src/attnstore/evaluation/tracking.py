"""Which episode each env row is, and when it ends: read off the vector env lerobot's rollout drives.

lerobot's ``rollout`` runs B envs in lockstep until all are done; a finished env keeps being stepped
(sync vector envs even auto-reset it into a new episode that lerobot discards). The policy hooks
alone cannot tell those rows apart, so :class:`EpisodeTracker` wraps one task's vector env at the
instance level (``reset``/``step``, so ``isinstance`` checks in lerobot still hold) and reports:

* at each new rollout (a reset carrying lerobot's ``NEW_ROLLOUT_OPTION``): the episode index of
  every row, numbered as lerobot numbers them (``batch * B + i`` within the task, shifted by the
  task's first episode in the run) and which rows count (``< n_episodes``);
* after each step: the rows that just ended, with success and length exactly as lerobot derives
  them for ``eval_info.json`` (length = done index + 1 = frames in that episode's video).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from attnstore.evaluation.libero_env import successes_from_info
from attnstore.schema import EpisodeRecord, TaskPlan  # TaskPlan: the run attrs' task plan, kept here too

__all__ = ["EpisodeTracker", "TaskPlan", "plan_tasks"]


def plan_tasks(task_ids: list[tuple[str, int]], n_episodes: int) -> list[TaskPlan]:
    """Run-wide episode numbering in lerobot's task order: task k owns episodes k*n .. k*n + n - 1.

    With one task this is exactly lerobot's per-task ``episode_ix`` (and video number).

    >>> [p.first_episode for p in plan_tasks([("libero_object", 0), ("libero_object", 2)], 3)]
    [0, 3]
    """
    return [TaskPlan(group, int(tid), k * n_episodes, n_episodes) for k, (group, tid) in enumerate(task_ids)]


BatchStart = Callable[[np.ndarray, np.ndarray], None]  # (episodes (B,), counted rows (B,) bool)
ActiveRows = Callable[[np.ndarray], None]  # rows still running (B,) bool
EpisodeEnd = Callable[[EpisodeRecord], None]


class EpisodeTracker:
    """Instance-level ``reset``/``step`` wrapper of one task's vector env (see module doc).

    ``install()`` shadows the env's methods with wrappers; ``uninstall()`` removes them again.
    """

    def __init__(
        self,
        env: Any,
        plan: TaskPlan,
        *,
        on_batch_start: BatchStart,
        on_active: ActiveRows,
        on_episode_end: EpisodeEnd,
    ) -> None:
        self.env = env
        self.plan = plan
        self.num_envs = int(env.num_envs)
        self._on_batch_start = on_batch_start
        self._on_active = on_active
        self._on_episode_end = on_episode_end
        self.batches = 0  # rollouts started
        self.steps = 0  # env steps of the current rollout
        self.max_steps = 0
        self.episodes = np.zeros(self.num_envs, np.int64)
        self.running = np.zeros(self.num_envs, bool)  # counted rows whose episode has not ended
        self.success = np.zeros(self.num_envs, bool)
        self.tasks: list[str] = [""] * self.num_envs
        self._originals: dict[str, Any] = {}

    # ---- wiring -------------------------------------------------------------------------------
    def install(self) -> EpisodeTracker:
        for name in ("reset", "step"):
            self._originals[name] = getattr(self.env, name)
            setattr(self.env, name, getattr(self, f"_{name}"))
        return self

    def uninstall(self) -> None:
        for name in self._originals:
            try:
                delattr(self.env, name)  # uncovers the class method again
            except AttributeError:
                pass
        self._originals.clear()

    # ---- wrapped methods ----------------------------------------------------------------------
    def _reset(self, *args: Any, **kwargs: Any):
        from lerobot.envs.utils import NEW_ROLLOUT_OPTION

        out = self._originals["reset"](*args, **kwargs)
        if (kwargs.get("options") or {}).get(NEW_ROLLOUT_OPTION):
            self._start_batch()
        return out

    def _step(self, actions: Any):
        out = self._originals["step"](actions)
        _, _, terminated, truncated, info = out
        self.steps += 1
        was_running = self.running.copy()
        self.success |= np.asarray(successes_from_info(info, self.num_envs), bool) & was_running
        ended = was_running & (np.asarray(terminated, bool) | np.asarray(truncated, bool))
        if self.steps >= self.max_steps:  # lerobot's rollout stops every env at max_steps
            ended = was_running.copy()
        if ended.any():
            self.running &= ~ended
            self._on_active(self.running.copy())
            for row in np.flatnonzero(ended):
                self._on_episode_end(self._record(int(row)))
        return out

    # ---- bookkeeping --------------------------------------------------------------------------
    def _start_batch(self) -> None:
        self.episodes = self.plan.episodes_of_batch(self.batches, self.num_envs)
        self.running = (self.episodes - self.plan.first_episode) < self.plan.n_episodes
        self.success[:] = False
        self.steps = 0
        self.max_steps = int(self.env.call("_max_episode_steps")[0])
        self.tasks = [str(t) for t in _task_texts(self.env, self.num_envs)]
        self.batches += 1
        self._on_batch_start(self.episodes.copy(), self.running.copy())

    def _record(self, row: int) -> EpisodeRecord:
        return EpisodeRecord(
            episode=int(self.episodes[row]),
            task_group=self.plan.task_group,
            task_id=self.plan.task_id,
            task=self.tasks[row],
            success=bool(self.success[row]),
            num_env_steps=self.steps,
        )


def _task_texts(env: Any, num_envs: int) -> list[str]:
    """The language instruction of each env row, asked the way lerobot's rollout asks."""
    for attr in ("task_description", "task"):
        try:
            return list(env.call(attr))
        except (AttributeError, NotImplementedError):
            continue
    return [""] * num_envs
