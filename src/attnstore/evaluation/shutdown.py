"""Ctrl-C during ``attnstore eval``: the run always ends within seconds, with the store closed as ``interrupted``.

lerobot's evaluation cannot be relied on to unwind from a ``KeyboardInterrupt``. The cause, upstream:
LIBERO's ``ControlEnv.reset`` (``libero/libero/envs/env_wrapper.py``) retries robosuite's reset in
``while not success: try: ... finally: continue``; a ``continue`` in ``finally`` discards every exception,
``KeyboardInterrupt`` included. When Ctrl-C lands in the reset between episodes, inside robosuite's
``_destroy_sim`` -> ``MjSim.free()`` (``del self._render_context_offscreen`` ... ``gc.collect()``, where the
EGL context is freed), the interrupt is swallowed and ``self.sim`` is left half-freed: every retry fails
again in ``free()`` (``del self._render_context_offscreen``: AttributeError), is swallowed again, and the
process spins in that loop for ever (a ``faulthandler`` dump shows the main thread at
``env_wrapper.py:99 in reset`` or ``binding_utils.py:1173 in free`` <- ``base.py:692 in _destroy_sim``).
A plain ``lerobot-eval`` hangs the same way. Ctrl-C during a long C call (a torch op, rendering) only
reaches Python when it returns, and interpreter shutdown after an interrupt would run the simulators'
EGL teardown in finalizers, which the interrupted state makes fail (``EGL_BAD_CONTEXT``): not relied on.

So :class:`InterruptGuard` does not depend on the main thread:

* its SIGINT handler raises ``KeyboardInterrupt`` once (the normal, clean path), and
  ``signal.set_wakeup_fd`` wakes a monitor thread at every SIGINT, even while the main thread is stuck;
* the main thread's interrupt path calls :meth:`InterruptGuard.finish`: close the store as
  ``interrupted``, print one line saying what was kept, end lerobot's env worker processes; the CLI
  then ends the process (exit 130) without the interpreter shutdown that can hang;
* if the main thread has not finished within :data:`GRACE_S` seconds (the interrupt was swallowed, or
  it is stuck), the monitor thread does the same itself and ends the process; a second Ctrl-C ends it
  at once (:data:`SECOND_S`), and :data:`LIMIT_S` after the first Ctrl-C it ends whatever is left.

A Ctrl-C that lands in a finalizer (robosuite frees its EGL contexts in ``__del__``) is printed by Python
as "Exception ignored in ..." and dropped: once interrupted, those reports are kept quiet and the monitor
ends the run. Async env workers get SIGINT blocked (:func:`sigint_blocked` around their creation), so a terminal's
Ctrl-C, sent to the whole process group, reaches only the main process: no worker tracebacks; the
workers are ended with SIGTERM by :func:`end_workers`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

GRACE_S = 3.0  # the main thread's time to unwind and close the store itself after the first Ctrl-C
SECOND_S = 1.0  # after a second Ctrl-C: the store's close gets this long, then the process ends
LIMIT_S = 10.0  # after the first Ctrl-C the process ends, whatever is still running
EXIT_CODE = 130  # 128 + SIGINT, what a shell reports for a Ctrl-C'ed command

_POKE = b"\xff"  # a byte no signal number takes: "look again" (the handler ran) ...
_STOP = b"\x00"  # ... and "stop watching" (the guard is left)


class EvalInterrupted(KeyboardInterrupt):
    """A Ctrl-C that :class:`InterruptGuard` already handled: the store is closed and the line printed.

    The CLI prints nothing more and calls :meth:`end_process` (exit 130, no interpreter shutdown).
    """

    reported = True

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def end_process(self) -> None:
        end_process(EXIT_CODE)


class InterruptGuard:
    """While open (in the main thread), Ctrl-C ends the evaluation in bounded time (see the module doc).

    ``closer`` is called once, by whichever thread gets there first, to close the store and return the
    one line to print (:meth:`watch` sets it once the store's writer exists; without one the line says
    nothing was recorded).
    """

    def __init__(self, *, grace_s: float = GRACE_S, second_s: float = SECOND_S, limit_s: float = LIMIT_S) -> None:
        self.grace_s, self.second_s, self.limit_s = grace_s, second_s, limit_s
        self.closer: Callable[[], str] | None = None
        self.interrupts = 0  # SIGINTs seen by the Python handler
        self.first_at: float | None = None
        self.message: str | None = None
        self.finished = threading.Event()
        self._lock = threading.Lock()
        self._active = False
        self._defer = 0  # > 0 while a close must not be cut short by the first Ctrl-C
        self._pending = False  # that Ctrl-C, raised when the close is done
        self._wake: tuple[socket.socket, socket.socket] | None = None
        self._monitor: threading.Thread | None = None
        self._previous: tuple[Any, int, Any] | None = None

    @property
    def interrupted(self) -> bool:
        return self.first_at is not None

    def watch(self, closer: Callable[[], str]) -> None:
        self.closer = closer

    # ---- installing ---------------------------------------------------------------------------
    def __enter__(self) -> InterruptGuard:
        if threading.current_thread() is not threading.main_thread():
            return self  # signals reach the main thread only: nothing to guard here
        read, write = socket.socketpair()
        read.setblocking(True)
        write.setblocking(False)
        self._wake = (read, write)
        previous_fd = signal.set_wakeup_fd(write.fileno(), warn_on_full_buffer=False)
        previous_handler = signal.signal(signal.SIGINT, self._on_sigint)
        self._previous = (previous_handler, previous_fd, sys.unraisablehook)
        sys.unraisablehook = self._on_unraisable
        self._active = True
        self._monitor = threading.Thread(target=self._watch_signals, name="attnstore-interrupt", daemon=True)
        self._monitor.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._active:
            return
        if self.interrupted and not self.finished.is_set():
            return  # the monitor must still end the process: leave it armed
        self._active = False
        handler, fd, unraisable = self._previous
        signal.signal(signal.SIGINT, handler)
        signal.set_wakeup_fd(fd)
        if sys.unraisablehook == self._on_unraisable:
            sys.unraisablehook = unraisable
        self._send(_STOP)
        if self._monitor is not None:
            self._monitor.join(timeout=1.0)
        for sock in self._wake:
            sock.close()

    # ---- the interrupt ------------------------------------------------------------------------
    def _on_sigint(self, signum, frame) -> None:  # main thread, between two bytecodes
        self.interrupts += 1
        if self.first_at is None:
            self.first_at = time.monotonic()
        self._send(_POKE)
        if self.interrupts == 1:  # the clean path; later ones are the monitor's
            if self._defer:
                self._pending = True
            else:
                raise KeyboardInterrupt

    def _on_unraisable(self, unraisable: Any) -> None:
        """Python prints an exception raised in a ``__del__`` ("Exception ignored in ...") and drops it:
        Ctrl-C landing in robosuite's EGL context finalizers does, and so do the errors it leaves behind
        (``EGL_BAD_CONTEXT``). Once interrupted they are noise (the monitor ends the run): kept quiet."""
        if self.interrupted:
            return
        self._previous[2](unraisable)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """While open, the first Ctrl-C does not raise (a store's close in progress must not be cut in
        half); it is raised when the block ends. The monitor's bounds still hold."""
        self._defer += 1
        try:
            yield
        finally:
            self._defer -= 1
        if not self._defer and self._pending:
            self._pending = False
            raise KeyboardInterrupt

    def finish(self) -> str:
        """Close the store and print the one line (once, whichever thread calls first); end env workers."""
        with self._lock:
            if self.message is None:
                self.message = _safe_call(self.closer) if self.closer is not None else (
                    "attnstore: interrupted during startup: no attention store was written")
                _write_line(self.message)
                end_workers()
                self.finished.set()
                self._send(_POKE)
            return self.message

    def interrupt(self) -> EvalInterrupted:
        """The main thread's interrupt path: finish, and the exception to raise to the CLI."""
        if self.first_at is None:  # a KeyboardInterrupt not from our handler (e.g. raised by a test)
            self.first_at = time.monotonic()
        return EvalInterrupted(self.finish())

    def _watch_signals(self) -> None:
        read = self._wake[0]
        seen = 0  # SIGINTs seen through the wakeup fd (the handler's count may lag behind, or be ahead)
        closing = False  # this thread started the store's close
        end_at = float("inf")  # when this thread ends the process
        while True:
            if closing and self.finished.is_set():
                end_process(EXIT_CODE)
            timeout = None
            if self.first_at is not None:
                next_check = end_at if closing else min(end_at, self.first_at + self.grace_s)
                timeout = max(0.01, next_check - time.monotonic())
            read.settimeout(timeout)
            try:
                data = read.recv(256)
            except TimeoutError:
                data = b""
            except OSError:  # the guard was left and its sockets closed
                return
            if _STOP in data:
                return  # left after the main thread's own finish (or without any interrupt)
            seen += data.count(bytes([signal.SIGINT]))
            count = max(seen, self.interrupts)
            if count and self.first_at is None:
                self.first_at = time.monotonic()
            if self.first_at is None:
                continue
            now = time.monotonic()
            end_at = min(end_at, self.first_at + self.limit_s)
            if count >= 2:  # a second Ctrl-C: end now, giving a close in progress a moment
                end_at = min(end_at, now + self.second_s)
            if not closing and (count >= 2 or now >= self.first_at + self.grace_s) and not self.finished.is_set():
                closing = True  # the main thread did not get there in time: close the store from here
                threading.Thread(target=self.finish, name="attnstore-close", daemon=True).start()
            if now >= end_at:
                end_process(EXIT_CODE)

    def _send(self, byte: bytes) -> None:
        if self._wake is not None:
            with contextlib.suppress(OSError):
                self._wake[1].send(byte)


# ---- ending things ------------------------------------------------------------------------------
def end_workers(timeout: float = 1.0) -> int:
    """SIGTERM (then SIGKILL) every multiprocessing child of this process (lerobot's async env workers);
    returns how many were running."""
    import multiprocessing

    children = [p for p in multiprocessing.active_children() if p.is_alive()]
    for p in children:
        with contextlib.suppress(Exception):
            p.terminate()
    deadline = time.monotonic() + timeout
    for p in children:
        with contextlib.suppress(Exception):
            p.join(max(0.0, deadline - time.monotonic()))
    for p in children:
        with contextlib.suppress(Exception):
            if p.is_alive():
                p.kill()
    return len(children)


def end_process(code: int) -> None:
    """End the process now, without interpreter shutdown: flush stdout/stderr and run multiprocessing's
    finalizers (they release the semaphores of lerobot's async envs, which the resource tracker would
    otherwise report as leaked), both bounded in time."""
    finisher = threading.Thread(target=_last_words, daemon=True)
    finisher.start()
    finisher.join(1.0)
    os._exit(code)


def _last_words() -> None:
    _flush_streams()
    if "multiprocessing" in sys.modules:
        with contextlib.suppress(Exception):
            from multiprocessing import util

            util._run_finalizers()  # what multiprocessing's own atexit hook runs (semaphores unlinked)
    _flush_streams()


@contextlib.contextmanager
def sigint_blocked() -> Iterator[None]:
    """SIGINT blocked in this thread while open: processes started inside inherit the mask, so a
    terminal's Ctrl-C does not reach them (lerobot's async env workers, their forkserver). A Ctrl-C
    meanwhile is delivered to this process once the block ends (or to another of its threads)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def start_forkserver() -> None:
    """Start multiprocessing's forkserver now (lerobot's async envs fork their workers from it lazily),
    so it inherits the caller's signal mask (see :func:`sigint_blocked`).

    multiprocessing's resource tracker, started first, unblocks SIGINT and SIGTERM in the calling thread
    when it has spawned (``resource_tracker.ensure_running``): the caller's mask is put back before the
    forkserver is spawned.
    """
    from multiprocessing import forkserver, resource_tracker

    mask = signal.pthread_sigmask(signal.SIG_BLOCK, set())
    resource_tracker.ensure_running()
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    forkserver.ensure_running()


def _safe_call(closer: Callable[[], str]) -> str:
    try:
        return closer()
    except Exception as exc:  # noqa: BLE001 - the interrupt path must end with its one line
        return f"attnstore: interrupted; closing the attention store failed: {type(exc).__name__}: {exc}"


def _write_line(line: str) -> None:
    """One line on stderr, written past Python's buffers (the main thread may hold their lock)."""
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    with contextlib.suppress(OSError):
        os.write(2, ("\n" + line.rstrip("\n") + "\n").encode(errors="replace"))


def _flush_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
