"""The store's writer as lerobot's evaluation sees it: a failure stops the capture, never the evaluation.

A full disk under ``--attention.store``, a refused row (NaN attention with the uint16 encoding) or any other
writer failure must not cost a user lerobot's own results. :class:`CaptureWriter` wraps the
:class:`~attnstore.store.writer.AttentionWriter` the recorder and the episode callbacks write through:
at the first failure it closes the store as ``interrupted`` with the reason (root attrs
``attnstore.status_reason``; every committed row stays readable), prints one ``attnstore:`` line, and
turns every later call into a no-op, so lerobot finishes its rollouts, ``eval_info.json`` and videos.
The runner then detaches the recorder at the next point outside the policy (:attr:`stopped`).
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable
from typing import Any

from attnstore.errors import AttnStoreError

INTERRUPTED = "interrupted"


class CaptureWriter:
    """Forwards ``start``/``append``/``end_episode`` to ``writer`` until the first failure (see module doc).

    ``halted`` (e.g. "Ctrl-C was pressed") makes every call a no-op as well, without any message: the
    interrupt path closes the store itself.
    """

    def __init__(
        self,
        writer: Any,
        *,
        halted: Callable[[], bool] = lambda: False,
        shield: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    ) -> None:
        self.writer = writer
        self.failure: str | None = None  # why the capture stopped, once it did
        self.final_status: str | None = None  # the status the store was closed with
        self._halted = halted
        self._shield = shield  # e.g. InterruptGuard.deferred: a close is never cut in half by Ctrl-C
        self._closing = threading.RLock()  # one close at a time (Ctrl-C may close from another thread)

    # ---- what the recorder and the runner read -------------------------------------------------
    @property
    def spec(self):
        return self.writer.spec

    @property
    def path(self):
        return self.writer.path

    @property
    def run(self):
        return self.writer.run

    @property
    def stats(self):
        return self.writer.stats

    @property
    def pending(self) -> int:
        return 0 if self.stopped else self.writer.pending

    @property
    def queue_depth(self) -> int:
        return 0 if self.stopped else self.writer.queue_depth

    @property
    def stopped(self) -> bool:
        return self.failure is not None or self._halted()

    # ---- writes ------------------------------------------------------------------------------
    def start(self, spec) -> None:
        self._call(self.writer.start, spec)

    def append(self, batch) -> None:
        self._call(self.writer.append, batch)

    def end_episode(self, record) -> None:
        self._call(self.writer.end_episode, record)

    def close(self, status: str = "closed", reason: str | None = None):
        """Close the store; a failure found only now stops the capture as any other (no exception).
        A second call (from any thread) waits for the first and returns the same stats."""
        with self._shield(), self._closing:
            if self.final_status is not None:
                return self.writer.stats
            try:
                stats = self.writer.close(status=status, reason=reason)
                self.final_status = status
                return stats
            except (AttnStoreError, OSError) as exc:
                self._fail(exc)
                return self.writer.stats

    def _call(self, method: Callable[..., Any], *args: Any) -> None:
        if self.stopped:
            return
        try:
            method(*args)
        except (AttnStoreError, OSError) as exc:
            if self._halted():
                return  # Ctrl-C closed the store meanwhile: the interrupt path reports
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        reason = describe(exc)
        self.failure = reason
        with self._shield(), self._closing:
            try:
                self.writer.close(status=INTERRUPTED, reason=reason)
            except (AttnStoreError, OSError):
                pass  # the writer records the failure as the store's reason itself when it can
            self.final_status = INTERRUPTED
        if self._halted():
            return  # Ctrl-C: the interrupt's one line says it
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        print(  # on a line of its own: lerobot's progress bars leave the cursor mid-line
            f"\nattnstore: attention capture stopped: {reason}; the store is closed as interrupted and "
            f"lerobot's evaluation goes on (eval_info.json and videos as usual)",
            file=sys.stderr,
            flush=True,
        )


def describe(exc: BaseException) -> str:
    """The failure in one line (a writer's own message already is one).

    >>> import errno
    >>> describe(OSError(errno.ENOSPC, "No space left on device"))
    'OSError: No space left on device'
    """
    if isinstance(exc, AttnStoreError):
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"
