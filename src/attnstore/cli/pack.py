"""``attnstore pack``: rewrite a finished store with sharding (few objects) to a path or URL."""

from __future__ import annotations

import argparse

from attnstore.cli._storage import STORE_HELP, add_storage_arguments, storage_options

HELP = "rewrite a finished store with Zarr v3 sharding (few objects) for archive and upload"
DESCRIPTION = """\
Copies every array of SRC to DEST; the per-inference arrays go into shards of many rows (inner chunks
unchanged: one inference is still one range read). Contents are identical (same stored integers) and
readers open both layouts the same way. DEST may be a URL: pack straight to object storage, e.g.
  AWS_ENDPOINT_URL=http://127.0.0.1:9000 attnstore pack run/attention.zarr s3://lab/study/run0.zarr
A store still being written (status 'writing') is refused."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help=f"the store to pack: {STORE_HELP}")
    parser.add_argument("dest", help="where to write the packed store (path or URL; must not exist)")
    parser.add_argument("--rows", type=int, default=None, metavar="N",
                        help="inference rows per shard (default: enough for <= 0.1 objects per inference, "
                             "~512 MB shards of the largest array, at most 4096)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing store at DEST")
    add_storage_arguments(parser, what="SRC (and DEST, unless --dest-storage-option is given)")
    add_storage_arguments(parser, "--dest-storage-option", what="DEST")


def run(args: argparse.Namespace) -> int:
    from attnstore.errors import StoreError
    from attnstore.store.pack import pack

    if args.rows is not None and args.rows < 1:
        raise StoreError(f"--rows must be >= 1, got {args.rows}")
    options = storage_options(args.storage_option)
    result = pack(args.source, args.dest, storage_options=options,
                  dest_storage_options=storage_options(args.dest_storage_option) or options,
                  rows=args.rows, overwrite=args.overwrite)
    objects = (f"{result.objects_before} -> {result.objects_after} objects"
               if result.objects_before is not None and result.objects_after is not None else "")
    print(f"attnstore pack: {result.rows} inferences, {result.arrays} arrays, {result.rows_per_shard} rows per "
          f"shard {objects} -> {args.dest}")
    return 0
