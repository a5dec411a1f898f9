"""``attnstore inspect``: summarise a store, a legacy .pt file or a folder of them."""

from __future__ import annotations

import argparse

HELP = "summarise an attention store, a legacy .pt file or a folder of .pt files"
DESCRIPTION = """\
For a store: status, size, encoding, layers, heads, denoise steps and times, shapes, key regions,
episodes (complete or not) and run attrs. For legacy .pt files: metadata, structure, an example
entry and shapes, like the old inspect_saved_attention.py. Reads no attention data (mmap for .pt).
Exit status 1 when a folder holds unreadable .pt files."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="attention.zarr store, .pt file or folder of .pt files")


def run(args: argparse.Namespace) -> int:
    from attnstore.legacy.inspect_pt import inspect_report

    text, bad = inspect_report(args.path)
    print(text)
    return 1 if bad else 0
