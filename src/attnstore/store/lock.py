"""One writer per store: a lock file beside it.

Two writers appending to one store would both write row n (and the shared index chunks): rows are
lost without an error. A lock file beside the store (``attention.zarr.lock``; inside it, zarr would
warn about a foreign object on every open) names the writing process; a lock whose process is
gone (a killed run) is taken over, so a killed eval can be resumed with mode "append".
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from attnstore.errors import StoreError


def lock_path(path: Path) -> Path:
    """The writer lock of the store at ``path``.

    >>> lock_path(Path("out/attention.zarr")).as_posix()
    'out/attention.zarr.lock'
    """
    return path.with_name(path.name + ".lock")


def lock_owner(path: Path) -> dict[str, Any] | None:
    """Who holds the store's writer lock, or None when nobody does (no lock, or its process is gone)."""
    try:
        owner = json.loads(lock_path(path).read_text())
        pid = int(owner["pid"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return None  # empty or garbled: its writer died while creating it
    if owner.get("host") != socket.gethostname():
        return owner  # another machine's process cannot be checked from here: assume it runs
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, another user's
    return owner


def _locked_message(path: Path, owner: Mapping[str, Any]) -> str:
    return (
        f"{path} is being written by another writer (pid {owner.get('pid')} on {owner.get('host')}): "
        f"write each process to its own store, or wait for it to finish; if no writer runs, delete {lock_path(path)}"
    )


def refuse_if_locked(path: Path) -> None:
    owner = lock_owner(path)
    if owner is not None:
        raise StoreError(_locked_message(path, owner))


def acquire_lock(path: Path) -> None:
    lock = lock_path(path)
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            refuse_if_locked(path)
            lock.unlink(missing_ok=True)  # its writer is gone: take over
            continue
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname()}, f)
        return
    raise StoreError(f"cannot lock {path} for writing: another writer keeps taking it; run one writer per store")


def release_lock(path: Path) -> None:
    lock = lock_path(path)
    try:
        if json.loads(lock.read_text()).get("pid") == os.getpid():
            lock.unlink()
    except (OSError, ValueError):
        pass
