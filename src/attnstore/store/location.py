"""Where a store lives: a local path, an fsspec URL (``s3://``, ``gs://``, ``file://``, ``memory://``) or a zarr
Store object, resolved once into a zarr Store plus the name the user gave (for error messages).

Storage options follow fsspec/xarray: ``storage_options={"endpoint_url": ..., "key": ...}`` in Python;
for the CLI, the standard environment variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...) that
the filesystem reads itself, plus repeatable ``--storage-option KEY=VALUE`` (:func:`parse_storage_options`).

>>> loc = locate("outputs/eval/run/attention.zarr")
>>> loc.is_local, loc.name
(True, 'outputs/eval/run/attention.zarr')
>>> locate("s3://bucket/runs/attention.zarr").is_local
False
>>> parse_storage_options(["endpoint_url=http://127.0.0.1:9000", "anon=false", "client_kwargs.region_name=x"])
{'endpoint_url': 'http://127.0.0.1:9000', 'anon': False, 'client_kwargs': {'region_name': 'x'}}
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnstore.errors import StoreError

Source = str | os.PathLike[str] | Any  # a path, a URL, or a zarr Store object
URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


@dataclass(frozen=True)
class Location:
    """A resolved store location. ``store`` is built on first use (remote filesystems import lazily)."""

    name: str  # as the user gave it, for messages
    path: Path | None = None  # local stores
    url: str | None = None  # fsspec URLs
    store_object: Any = None  # a zarr Store the user passed
    storage_options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_local(self) -> bool:
        return self.path is not None

    def store(self, *, read_only: bool = True):
        """The zarr Store for this location; for reading, a :class:`~attnstore.store.integrity.CheckedStore`
        (damaged chunks raise one-line errors instead of decoding into numbers)."""
        store = self._raw_store(read_only)
        if not read_only:
            return store
        from attnstore.store.integrity import CheckedStore

        return store if isinstance(store, CheckedStore) else CheckedStore(store, self.name)

    def _raw_store(self, read_only: bool):
        if self.store_object is not None:
            return self.store_object
        from zarr.storage import FsspecStore, LocalStore

        if self.path is not None:
            return LocalStore(self.path, read_only=read_only)
        try:
            return FsspecStore.from_url(self.url, storage_options=dict(self.storage_options), read_only=read_only)
        except ImportError as exc:
            raise StoreError(f"cannot open {self.name}: {exc} (install the filesystem package, e.g. s3fs)") from exc
        except (ValueError, TypeError) as exc:
            raise StoreError(f"cannot open {self.name}: {exc}") from exc

    def read_json(self, key: str) -> dict[str, Any] | None:
        """A JSON object of the store (``zarr.json``), None when it does not exist; errors in one line."""
        if self.path is not None:
            file = self.path / key
            if not file.is_file():
                return None
            raw = file.read_bytes()
        else:
            raw = _get_bytes(self, key)
            if raw is None:
                return None
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise StoreError(f"{self.name}/{key} is unreadable ({exc}): the store is damaged") from exc

    def size_bytes(self) -> int | None:
        """Total bytes of the store's objects (None when the storage cannot say)."""
        if self.path is not None:
            return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())
        if self.url is None:
            return None
        try:
            import fsspec

            fs = fsspec.filesystem(self.url.split("://", 1)[0], **dict(self.storage_options))
            return int(fs.du(self.url))
        except Exception:  # a size is a report, never a failure
            return None

    def exists(self) -> bool:
        if self.path is not None:
            return self.path.exists()
        return self.read_json("zarr.json") is not None


def locate(source: Source, storage_options: Mapping[str, Any] | None = None) -> Location:
    """Resolve a path, URL or zarr Store object. ``file://`` URLs become local paths."""
    options = dict(storage_options or {})
    if isinstance(source, Location):
        return source
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if text.startswith("file://"):
            return Location(name=text, path=Path(text[len("file://"):]), storage_options=options)
        if URL.match(text):
            return Location(name=text, url=text, storage_options=options)
        if options:
            raise StoreError(f"storage options were given for the local path {text}; they apply to URLs only")
        return Location(name=text, path=Path(text))
    if hasattr(source, "get") and hasattr(source, "list_prefix"):  # a zarr.abc.store.Store
        root = getattr(source, "root", None)
        if root is not None and type(source).__name__ == "LocalStore":
            return Location(name=str(root), path=Path(root))
        return Location(name=f"{type(source).__name__}({getattr(source, 'path', '') or root or ''})",
                        store_object=source)
    raise StoreError(f"cannot open {source!r}: pass a path, an fsspec URL (s3://...) or a zarr Store object")


def parse_storage_options(items: Sequence[str] | None) -> dict[str, Any]:
    """``KEY=VALUE`` strings (repeatable ``--storage-option``) -> a storage options dict.

    Values ``true``/``false``/``none`` and numbers become Python values; dotted keys nest
    (``client_kwargs.region_name=eu-west-1``).

    >>> parse_storage_options(["key=abc", "use_ssl=False", "max_concurrency=4"])
    {'key': 'abc', 'use_ssl': False, 'max_concurrency': 4}
    >>> parse_storage_options(["nothing"])
    Traceback (most recent call last):
    ...
    attnstore.errors.StoreError: --storage-option 'nothing': use KEY=VALUE, e.g. endpoint_url=http://127.0.0.1:9000
    """
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise StoreError(f"--storage-option {item!r}: use KEY=VALUE, e.g. endpoint_url=http://127.0.0.1:9000")
        target = out
        *parents, leaf = key.split(".")
        for part in parents:
            target = target.setdefault(part, {})
        target[leaf] = _value(value)
    return out


def describe_failure(location: Location, exc: BaseException) -> str:
    """One line for an error of a remote filesystem (missing bucket, credentials, no connection)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    name = type(exc).__name__
    if isinstance(exc, FileNotFoundError) or "NoSuchBucket" in text:
        return f"{location.name} does not exist ({text}): check the bucket and path"
    if isinstance(exc, PermissionError) or any(
        s in text for s in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "credentials")
    ):
        return (f"{location.name}: access denied ({text}): check the credentials "
                f"(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or --storage-option key=... secret=...)")
    if "connect" in text.lower() or name in ("EndpointConnectionError", "ClientConnectorError"):
        return f"cannot reach {location.name} ({text}): check AWS_ENDPOINT_URL / --storage-option endpoint_url=..."
    return f"cannot read {location.name}: {name}: {text}"


def _get_bytes(location: Location, key: str) -> bytes | None:
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    store = location._raw_store(read_only=True)
    try:
        buf = sync(store.get(key, prototype=default_buffer_prototype()))
    except FileNotFoundError:
        return None
    except Exception as exc:  # botocore / aiohttp errors: one line naming the URL
        raise StoreError(describe_failure(location, exc)) from exc
    return None if buf is None else buf.to_bytes()


def _value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
