"""``attnstore inspect``: summarise a store (path or URL), a legacy .pt file or a folder of them."""

from __future__ import annotations

import argparse

from attnstore.cli._storage import add_storage_arguments, storage_options

HELP = "summarise an attention store (path or URL), a legacy .pt file or a folder of .pt files"
DESCRIPTION = """\
For a store: status (and why, for an interrupted run), size, encoding, layers, heads, denoise steps and
times, shapes, key regions, episodes (complete or not) and run attrs. For legacy .pt files: metadata,
structure, an example entry and shapes, like the old inspect_saved_attention.py. Reads no attention data
(mmap for .pt), except with --verify: then every chunk of the store is read and checked (absent,
truncated, checksum) and the damaged rows are listed, exit status 1 when there are any.
A store may be an fsspec URL (s3://bucket/run/attention.zarr): credentials and endpoint come from
the AWS_* environment variables (AWS_ENDPOINT_URL for an S3-compatible server) or --storage-option.
Exit status 1 when a folder holds unreadable .pt files."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="attention.zarr store (path or URL), .pt file or folder of .pt files")
    parser.add_argument("--verify", action="store_true",
                        help="read every chunk of the store and list damaged rows (exit 1 if any)")
    add_storage_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from attnstore.store.location import locate

    options = storage_options(args.storage_option)
    location = locate(args.path, options)
    if args.verify:
        return _verify(location)
    if not location.is_local:
        from attnstore.store.inspect import inspect_store

        print(inspect_store(location))
        return 0
    from attnstore.legacy.inspect_pt import inspect_report

    text, bad = inspect_report(args.path)
    print(text)
    return 1 if bad else 0


def _verify(location) -> int:
    from attnstore.errors import StoreDamagedError, StoreError
    from attnstore.store.inspect import inspect_store
    from attnstore.store.verify import verify_store

    if location.is_local and location.path.is_file():
        raise StoreError(f"{location.name}: --verify checks attention stores (an attention.zarr folder or URL)")
    report = verify_store(location)
    try:
        print(inspect_store(location))
    except StoreDamagedError as exc:  # the summary's own columns are damaged: the report below says which
        print(f"Attention store: {location.name}\n  (no summary: {exc})")
    print()
    print(report.text())
    return 0 if report.ok else 1
