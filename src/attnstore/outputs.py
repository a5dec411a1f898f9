"""Output locations, checked before any work starts: one line instead of a traceback halfway through.

:func:`check_writable_dir` is the one check every command that writes files runs on its output folder
(``export-pt OUT_DIR``, ``overlay --out``, ``plot --out``, ``make-tiny-policy DIR``). Permission bits
are not enough (root writes into a ``chmod 555`` folder, but not onto a read-only mount or into
``/proc``), so the check tries: it creates and removes a temporary file in the folder, or in the
nearest existing folder above it when the folder does not exist yet (nothing is left behind).

>>> import tempfile
>>> with tempfile.TemporaryDirectory() as tmp:
...     check_writable_dir(Path(tmp) / "new" / "plots", "--out") == Path(tmp) / "new" / "plots"
True
>>> check_writable_dir("/proc/attnstore-test/out", "OUT_DIR")
Traceback (most recent call last):
...
attnstore.errors.StoreError: cannot write OUT_DIR /proc/attnstore-test/out: /proc is not writable (...)
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from attnstore.errors import StoreError


def check_writable_dir(path: str | os.PathLike[str], what: str = "output folder", *, hint: str = "") -> Path:
    """``path`` as a Path, or a one-line :class:`StoreError` unless it is (or can become) a writable folder.

    ``what`` names the folder in the message (a flag or argument name); ``hint`` is appended to it
    (e.g. ``"pass --out DIR"``). Nothing is created: a missing folder is checked through the nearest
    existing folder above it.
    """
    out = Path(path).expanduser()
    tail = f"; {hint}" if hint else ""
    if out.exists() and not out.is_dir():
        raise StoreError(f"cannot write {what} {out}: it is a file, not a folder{tail}")
    probe = out
    while not probe.exists():
        if probe.parent == probe:  # pragma: no cover - the root always exists
            break
        probe = probe.parent
    if not probe.is_dir():
        raise StoreError(f"cannot write {what} {out}: {probe} is a file, not a folder{tail}")
    try:
        fd, name = tempfile.mkstemp(dir=probe, prefix=".attnstore-write-test-")
    except OSError as exc:
        # ENOENT in a folder that exists: a pseudo file system such as /proc, which takes no new files
        reason = "it takes no new files" if exc.errno == errno.ENOENT else exc.strerror or type(exc).__name__
        raise StoreError(f"cannot write {what} {out}: {probe} is not writable ({reason}){tail}") from exc
    os.close(fd)
    try:
        os.unlink(name)
    except OSError:  # pragma: no cover - a file we just created
        pass
    return out
