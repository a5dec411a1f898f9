"""Which episode and env step each batch row of a model run belongs to (the recorder's bookkeeping).

lerobot-eval calls ``policy.reset()`` once per batch of B episodes and ``select_action`` once per env
step; finished envs keep stepping, masked. :class:`EpisodeBook` follows that from the wrapped calls
alone, with no torch and no policy:

>>> book = EpisodeBook(first_episode=0)
>>> book.start_batch(2).tolist(), book.env_step      # first model run of the first batch
([0, 1], 0)
>>> book.after_select(); book.after_select(); book.env_step
2
>>> book.set_active([True, False]); book.keep().tolist()
[True, False]
>>> book.reset(); book.start_batch(2).tolist(), book.keep() is None   # the next batch: episodes 2, 3
([2, 3], True)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from attnstore.errors import CaptureError


class EpisodeBook:
    """Episode numbers, active rows and env steps of the batch in progress.

    Episodes: each ``reset()`` after a batch that ran the model starts the next B episodes
    (``first_episode + batches_so_far * B + i``, lerobot-eval's numbering); ``set_episodes`` overrides
    them until the next reset (the numbering then continues after the largest one).
    Env step: ``select_action`` calls since the last reset (the first is 0).
    """

    def __init__(self, first_episode: int = 0) -> None:
        if first_episode < 0:
            raise CaptureError(f"first_episode must be >= 0, got {first_episode}")
        self._base = int(first_episode)
        self.batch_size: int | None = None
        self._episodes: np.ndarray | None = None
        self._active: np.ndarray | None = None
        self.env_step = 0

    def reset(self) -> None:
        """``policy.reset()``: the next batch of episodes starts at env step 0."""
        if self.batch_size is not None:
            self._base = self._base + self.batch_size if self._episodes is None else int(self._episodes.max()) + 1
        self.batch_size = None
        self._episodes = None
        self._active = None
        self.env_step = 0

    def after_select(self) -> None:
        """One ``select_action`` call (one env step) is over."""
        self.env_step += 1

    def start_batch(self, batch_size: int) -> np.ndarray:
        """A model run on ``batch_size`` rows: check the batch size, return each row's episode index."""
        if self.batch_size is None:
            self.batch_size = int(batch_size)
        elif batch_size != self.batch_size:
            raise CaptureError(
                f"batch size changed from {self.batch_size} to {batch_size} without policy.reset(); "
                f"call policy.reset() when a new batch of episodes starts"
            )
        for name, flags in (("set_active", self._active), ("set_episodes", self._episodes)):
            if flags is not None and len(flags) != batch_size:
                raise CaptureError(f"{name} got {len(flags)} values for a batch of {batch_size}")
        if self._episodes is not None:
            return self._episodes.copy()
        return np.arange(self._base, self._base + self.batch_size, dtype=np.int64)

    def keep(self) -> np.ndarray | None:
        """Rows to record now (None = all), or an all-False mask when every env has finished."""
        return None if self._active is None else self._active.copy()

    def set_active(self, active: Any) -> None:
        """(B,) bool: rows recorded from now on (finished envs False). ``reset()`` re-activates all."""
        flags = np.asarray(active, dtype=bool).reshape(-1)
        self._check_length("set_active", flags, "flags")
        self._active = flags

    def set_episodes(self, episodes: Any) -> None:
        """Explicit episode indices of the current batch's rows (until the next ``reset()``)."""
        values = np.asarray(episodes, dtype=np.int64).reshape(-1)
        if (values < 0).any():
            raise CaptureError(f"set_episodes: episode indices must be >= 0, got {values.tolist()}")
        self._check_length("set_episodes", values, "indices")
        self._episodes = values

    def _check_length(self, name: str, values: np.ndarray, what: str) -> None:
        if self.batch_size is not None and len(values) != self.batch_size:
            raise CaptureError(f"{name}: expected {self.batch_size} {what} (the batch size), got {len(values)}")
