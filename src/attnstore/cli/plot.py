"""``attnstore plot``: summary figures of a store (region shares, entropy, layers, success vs failure)."""

from __future__ import annotations

import argparse

from attnstore.cli._storage import URL_EPILOG, add_store_argument, default_output, locate_store

HELP = "summary figures: attention share per region over time, entropy per denoise step and layer"
DESCRIPTION = """\
Write PNG figures summarising where the action tokens look:
  region_shares.png          share per region (each camera, language, action) over env steps
  entropy_per_denoise.png    attention entropy per denoise step, one line per layer
  per_layer.png              region shares and entropy per captured layer
  success_vs_failure.png     region shares over env steps, successful vs failed episodes
                             (whole store only, when it holds several finished episodes)
With --episode, the first three show that episode; without it, the mean over all episodes.

example:
  attnstore plot outputs/eval/attention.zarr --out outputs/eval/plots

""" + URL_EPILOG.format(command="plot", args=" --out plots") + """
For a store read from a URL the figures go to ./<run>_plots in the current folder unless --out is
given (<run>: the folder holding attention.zarr, e.g. task0_plots).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_store_argument(parser)
    parser.add_argument("--episode", type=int, default=None, help="one episode (default: all episodes)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="local output folder (default: 'plots' next to a local store, ./<run>_plots for a URL)")


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from attnstore.readers.plots import write_plots

    location = locate_store(args)
    out = Path(args.out) if args.out else default_output(location, "plots")
    result = write_plots(location, out, episode=args.episode)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {len(result.figures)} figure(s) under {out}:")
    for path in result.figures:
        print(f"  {path.name}")
    return 0
