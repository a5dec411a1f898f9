"""``--storage-option KEY=VALUE`` for every command that reads or writes a store by URL.

Credentials and endpoints come the way s3fs/gcsfs users already pass them: the standard environment
variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``GOOGLE_APPLICATION_CREDENTIALS``)
that the filesystem reads itself, plus this repeatable flag for anything else.
"""

from __future__ import annotations

import argparse
from typing import Any

STORE_HELP = "a store: local path or fsspec URL (s3://bucket/run/attention.zarr, gs://..., memory://...)"


def add_storage_arguments(parser: argparse.ArgumentParser, flag: str = "--storage-option",
                          what: str = "the store") -> None:
    parser.add_argument(
        flag, action="append", default=[], metavar="KEY=VALUE",
        help=f"fsspec storage option for {what} when it is a URL (repeatable; e.g. endpoint_url=http://127.0.0.1:9000, "
             f"anon=true, client_kwargs.region_name=eu-west-1); credentials also come from AWS_* environment variables",
    )


def storage_options(values: list[str] | None) -> dict[str, Any] | None:
    from attnstore.store.location import parse_storage_options

    return parse_storage_options(values) or None
