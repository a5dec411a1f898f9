"""``attnstore export-pt``: write a store's attention as legacy per-episode ``.pt`` files."""

from __future__ import annotations

import argparse

from attnstore.cli._storage import URL_EPILOG, add_store_argument, locate_store

HELP = "export a store to legacy per-episode .pt files (the old save_attention_maps format)"
DESCRIPTION = """\
Write OUT_DIR/<task_group>_<task_id>/episode_<05d>_attention.pt for each episode, in the legacy layout:
data['rollout_steps'][i]['attention_maps'][denoise]['attention_weights'][layer] -> (1, heads, 50, keys).
rollout_step is the env step (video frame). The dict carries both the guide's keys (metadata.episode_index,
num_denoising_steps) and the fork's (top-level episode_index = the file's number, batch_index,
metadata.num_denoising_steps_per_action), so scripts written for either run unchanged. Episodes are
streamed one at a time; each file is written atomically. With --every-env-step there is one entry per
video frame (each inference's maps repeated for the frames it served). OUT_DIR is a local folder.

""" + URL_EPILOG.format(command="export-pt", args=" OUT_DIR")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_store_argument(parser, "attention store (attention.zarr)")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="local folder to write the .pt files into")
    parser.add_argument("--episodes", type=int, nargs="+", metavar="E", help="episodes to export (default: all)")
    parser.add_argument("--layers", type=int, nargs="+", metavar="L", help="layers to export (default: all stored)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="tensor dtype (default float32)")
    parser.add_argument("--every-env-step", action="store_true", help="one entry per env step instead of per inference")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from attnstore.legacy.export_pt import export_pt
    from attnstore.outputs import check_writable_dir

    location = locate_store(args)
    check_writable_dir(args.out_dir, "OUT_DIR")

    paths = export_pt(
        location,
        args.out_dir,
        episodes=args.episodes,
        layers=args.layers,
        dtype=args.dtype,
        every_env_step=args.every_env_step,
        progress=not args.no_progress,
    )
    for path in paths:
        print(path)
    return 0
