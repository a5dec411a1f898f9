"""``attnstore import-pt``: convert legacy per-episode ``.pt`` files into a store."""

from __future__ import annotations

import argparse

HELP = "import legacy per-episode .pt attention files into a new store"
DESCRIPTION = """\
Convert legacy .pt files (or folders of them, searched recursively) into one attention store.
Reads both variants: the guide's (metadata.episode_index) and what the fork's lerobot_eval.py writes
(top-level episode_index/batch_index, all 18 layers, bf16 saved from cuda:0: loaded onto the CPU).
All or nothing: a truncated, garbled or wrongly laid out file stops the import with a one-line error
and no store is left behind. Files are streamed entry by entry (memory holds a few entries, never a
whole file), with a progress bar per file. Episode index from metadata.episode_index, else the
top-level one; task from the parent folder name <group>_<id>. The token layout is inferred (LIBERO
Pi0.5: 3 cameras x 256 patches + 200 language tokens) unless the files were written by
'attnstore export-pt'; see --num-language / --grid / --cameras."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="PT_FILE_OR_DIR", help=".pt files or folders of them")
    parser.add_argument("store", metavar="STORE", help="attention store to create (attention.zarr folder)")
    parser.add_argument("--encoding", choices=("portable", "compact", "analysis", "float32", "uint16"), default="portable",
                        help="store encoding (default portable; see README 'Encoding')")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing attnstore store at STORE")
    parser.add_argument("--num-language", type=int, default=200, help="language tokens in the key axis (default 200)")
    parser.add_argument("--grid", type=int, default=16, help="patch grid side per camera (default 16 -> 256 patches)")
    parser.add_argument("--cameras", nargs="+", metavar="NAME", help="camera slot names in key order")
    parser.add_argument("--keep-repeats", action="store_true",
                        help="keep consecutive entries with identical maps as separate inferences")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from attnstore.legacy.import_pt import LayoutGuess, import_pt

    guess = LayoutGuess(num_language=args.num_language, grid=args.grid,
                        cameras=tuple(args.cameras) if args.cameras else None)
    store = import_pt(args.inputs, args.store, encoding=args.encoding, overwrite=args.overwrite,
                      guess=guess, keep_repeats=args.keep_repeats, progress=not args.no_progress)
    print(store)
    return 0
