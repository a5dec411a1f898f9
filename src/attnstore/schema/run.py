"""The run attrs: what produced a store (:class:`RunInfo`) and its task plans (:class:`TaskPlan`).

``attnstore eval`` writes a :class:`RunInfo` into the root attrs (``run``); readers and export read it
back with :meth:`RunInfo.from_dict`, never by key strings. Runs written by older code, by other tools
(``import-pt``) or by tests may lack keys (they read as None / empty) or carry others: those stay
readable in :attr:`RunInfo.extra` and are written back by :meth:`RunInfo.to_dict`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from attnstore.errors import SchemaError
from attnstore.schema.names import TASK_GROUP, TASK_ID


@dataclass(frozen=True)
class TaskPlan:
    """One (task_group, task_id) of the run and the run-wide episode numbers it owns.

    >>> plan = TaskPlan("libero_object", 3, first_episode=4, n_episodes=2)
    >>> plan.episodes_of_batch(0, batch_size=2).tolist(), plan.episodes_of_batch(1, batch_size=2).tolist()
    ([4, 5], [6, 7])
    >>> plan.video_name(5), plan.owns(6), TaskPlan.from_dict(plan.to_dict()) == plan
    ('libero_object_3/eval_episode_1.mp4', False, True)
    """

    task_group: str
    task_id: int
    first_episode: int
    n_episodes: int

    def episodes_of_batch(self, batch: int, batch_size: int) -> np.ndarray:
        return self.first_episode + batch * batch_size + np.arange(batch_size)

    def owns(self, episode: int) -> bool:
        """Whether ``episode`` (run-wide numbering) is one of this task's."""
        return self.first_episode <= int(episode) < self.first_episode + self.n_episodes

    def local_index(self, episode: int) -> int:
        """lerobot's ``episode_ix`` within this task (eval_info.json, video names)."""
        return int(episode) - self.first_episode

    def video_name(self, episode: int) -> str:
        """Video of ``episode`` relative to ``<output_dir>/videos`` (lerobot renders the first 10 only)."""
        return f"{self.task_group}_{self.task_id}/eval_episode_{self.local_index(episode)}.mp4"

    def to_dict(self) -> dict[str, Any]:
        return {
            "task_group": self.task_group,
            "task_id": self.task_id,
            "first_episode": self.first_episode,
            "n_episodes": self.n_episodes,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskPlan:
        """A plan from its dict; missing fields read as unknown (group ``""``, id -1, no episodes)."""
        if not isinstance(data, Mapping):
            raise SchemaError(f"run attrs: a task plan must be a mapping, got {data!r}")
        try:
            return cls(
                task_group=str(data.get("task_group", "")),
                task_id=int(data.get("task_id", -1)),
                first_episode=int(data.get("first_episode", 0)),
                n_episodes=int(data.get("n_episodes", 0)),
            )
        except (TypeError, ValueError) as exc:
            raise SchemaError(f"run attrs: task plan {dict(data)} has a non-integer field ({exc})") from None


def _opt(convert: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda v: None if v is None else convert(v)


def _ints(v: Any) -> tuple[int, ...]:
    return tuple(int(x) for x in v)


@dataclass(frozen=True)
class RunInfo:
    """What produced a store: the command, the policy, the env, lerobot's eval settings, the task plans.

    Every field may be unknown (None / empty) for runs that did not record it. ``extra`` holds the
    keys this attnstore does not know, so that they stay readable and are written back.

    >>> run = RunInfo.from_dict({"n_action_steps": 10, "task_ids": [0], "task_group": "libero_object"})
    >>> run.n_action_steps, run.task_ids, run.extra, run.tool
    (10, (0,), {'task_group': 'libero_object'}, None)
    >>> RunInfo.from_dict(run.to_dict()) == run
    True
    """

    tool: str | None = None
    argv: tuple[str, ...] = ()
    policy: str | None = None  # local checkpoint directory or hub id
    policy_type: str | None = None
    tiny_policy: bool | None = None
    n_action_steps: int | None = None  # env steps each inference serves (the last one may serve fewer)
    env_type: str | None = None
    env_task: str | None = None  # the task suite, e.g. libero_object
    task_ids: tuple[int, ...] | None = None  # --env.task_ids (None = all tasks of the suite)
    episode_length: int | None = None
    n_episodes: int | None = None  # per task (lerobot's --eval.n_episodes)
    batch_size: int | None = None
    use_async_envs: bool | None = None
    seed: int | None = None
    output_dir: str | None = None
    eval_info: str | None = None
    videos_dir: str | None = None
    lerobot_version: str | None = None
    attention: Mapping[str, Any] = field(default_factory=dict)  # the --attention.* settings
    tasks: tuple[TaskPlan, ...] = ()  # run-wide episode numbering, in lerobot's task order
    extra: Mapping[str, Any] = field(default_factory=dict)  # keys this attnstore does not know

    def task_of(self, episode: int) -> TaskPlan | None:
        """The task plan that owns ``episode`` (run-wide numbering), or None."""
        return next((plan for plan in self.tasks if plan.owns(episode)), None)

    def video_index(self, episode: int) -> int:
        """lerobot's per-task episode number (``eval_episode_N.mp4``) of a run-wide store episode.

        ``attnstore eval`` numbers episodes across the whole run (task k starts at ``first_episode``);
        an episode outside every task (or a run without plans) keeps its number.

        >>> tasks = [{"first_episode": 0, "n_episodes": 2}, {"first_episode": 2, "n_episodes": 2}]
        >>> [RunInfo.from_dict({"tasks": tasks}).video_index(e) for e in range(5)], RunInfo().video_index(3)
        ([0, 1, 0, 1, 4], 3)
        """
        plan = self.task_of(episode)
        return int(episode) if plan is None else plan.local_index(episode)

    def task_guess(self, episode: int) -> tuple[str | None, int | None]:
        """(task_group, task_id) of ``episode`` as far as the run attrs tell (for an episode without a
        table row): its task plan, else a run-wide ``task_group``/``task_id`` (other writers), the id
        also from a single ``task_ids`` entry; None where unknown.

        >>> RunInfo(tasks=(TaskPlan("libero_goal", 4, 0, 2),)).task_guess(1)
        ('libero_goal', 4)
        >>> RunInfo.from_dict({"task_group": "libero_object", "task_ids": [0, 1]}).task_guess(2)
        ('libero_object', None)
        """
        plan = self.task_of(episode)
        if plan is not None:
            return plan.task_group or None, plan.task_id if plan.task_id >= 0 else None
        group = self.extra.get(TASK_GROUP) or None
        task_id = self.extra.get(TASK_ID)
        if task_id is None and self.task_ids is not None and len(self.task_ids) == 1:
            task_id = self.task_ids[0]
        return group, task_id

    def to_dict(self) -> dict[str, Any]:
        """The JSON dict of the root attrs (known keys in field order, then the ``extra`` ones)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if f.name == "tasks":
                value = [plan.to_dict() for plan in value]
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, Mapping):
                value = dict(value)
            out[f.name] = value
        out.update({k: v for k, v in self.extra.items() if k not in out})
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> RunInfo:
        """Read run attrs; missing keys are unknown, unknown keys go to :attr:`extra`."""
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise SchemaError(f"run attrs must be a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key not in known:
                continue
            try:
                values[key] = _CONVERT.get(key, _opt(str))(value)
            except (TypeError, ValueError) as exc:
                raise SchemaError(f"run attrs: {key}={value!r} is not readable ({exc})") from None
        return cls(**values, extra={k: v for k, v in data.items() if k not in known})


def _tasks(value: Any) -> tuple[TaskPlan, ...]:
    if value is None:
        return ()
    if isinstance(value, (str, Mapping)):
        raise TypeError("expected a list of task plans")
    return tuple(TaskPlan.from_dict(t) for t in value)


_CONVERT: dict[str, Callable[[Any], Any]] = {
    "argv": lambda v: () if v is None else tuple(str(a) for a in v),
    "tiny_policy": _opt(bool),
    "use_async_envs": _opt(bool),
    "n_action_steps": _opt(int),
    "task_ids": _opt(_ints),
    "episode_length": _opt(int),
    "n_episodes": _opt(int),
    "batch_size": _opt(int),
    "seed": _opt(int),
    "attention": lambda v: dict(v or {}),
    "tasks": _tasks,
}
