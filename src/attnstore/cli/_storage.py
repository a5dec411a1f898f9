"""The store argument and ``--storage-option KEY=VALUE`` for every command that reads or writes a store by URL.

Credentials and endpoints come the way s3fs/gcsfs users already pass them: the standard environment
variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``GOOGLE_APPLICATION_CREDENTIALS``)
that the filesystem reads itself, plus this repeatable flag for anything else. Outputs stay local folders:
for a store read from a URL the default output folder is in the current folder (:func:`default_output`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

STORE_HELP = "a store: local path or fsspec URL (s3://bucket/run/attention.zarr, gs://..., memory://...)"
URL_EPILOG = """\
A store may be an fsspec URL (s3://bucket/run/attention.zarr, gs://..., file://...): credentials and
endpoint come from the standard environment variables (AWS_ENDPOINT_URL for an S3-compatible server,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...) or --storage-option KEY=VALUE, e.g.
  AWS_ENDPOINT_URL=http://127.0.0.1:9000 attnstore {command} s3://lab/study/runs/task0/attention.zarr{args}"""


def add_storage_arguments(parser: argparse.ArgumentParser, flag: str = "--storage-option",
                          what: str = "the store") -> None:
    parser.add_argument(
        flag, action="append", default=[], metavar="KEY=VALUE",
        help=f"fsspec storage option for {what} when it is a URL (repeatable; e.g. endpoint_url=http://127.0.0.1:9000, "
             f"anon=true, client_kwargs.region_name=eu-west-1); credentials also come from AWS_* environment variables",
    )


def add_store_argument(parser: argparse.ArgumentParser, help: str = "the attention store an evaluation wrote",
                       metavar: str = "STORE") -> None:
    """The positional ``store`` (a path or URL) and its ``--storage-option``."""
    parser.add_argument("store", metavar=metavar, help=f"{help}: local path or fsspec URL (s3://..., gs://...)")
    add_storage_arguments(parser)


def storage_options(values: list[str] | None) -> dict[str, Any] | None:
    from attnstore.store.location import parse_storage_options

    return parse_storage_options(values) or None


def locate_store(args: argparse.Namespace):
    """The :class:`~attnstore.store.location.Location` of ``args.store`` with its ``--storage-option`` values."""
    from attnstore.store.location import locate

    return locate(args.store, storage_options(args.storage_option))


def default_output(location, folder: str) -> Path:
    """Where a command writes when no ``--out`` is given: ``folder`` next to a local store; for a store read
    from a URL (or a zarr Store object) ``./<run>_<folder>`` in the current folder, ``<run>`` named as
    :func:`attnstore.open_study` names runs (the folder holding ``attention.zarr``, or the store's name).

    >>> from attnstore.store.location import locate
    >>> default_output(locate("s3://lab/study/runs/task0/attention.zarr"), "overlays")
    PosixPath('task0_overlays')
    >>> default_output(locate("gs://lab/run1.zarr"), "plots")
    PosixPath('run1_plots')
    >>> default_output(locate("/data/eval/attention.zarr"), "plots")
    PosixPath('/data/eval/plots')
    """
    if location.is_local:
        return location.path.resolve().parent / folder
    from attnstore.store.study import run_names

    run = run_names([location])[0] if location.url is not None else "store"
    return Path(f"{run.replace('/', '_')}_{folder}")
