"""``attnstore view``: scrub one episode's attention in the Rerun viewer (needs ``attnstore[viz]``)."""

from __future__ import annotations

import argparse

from attnstore.cli._storage import URL_EPILOG, add_store_argument, storage_options

HELP = "scrub an episode's attention in the Rerun viewer (local, distant/web, or a saved .rrd)"
DESCRIPTION = """\
Log one episode to Rerun, the way lerobot-dataset-viz shows datasets: per camera the exact
224x224 image the policy saw over the action tokens' attention heat map (each 16x16-grid patch on
its 14x14 pixels; one toggleable entity per layer and denoise step:
cameras/<cam>/attention/layer_<L>/denoise_<D>), the attention share per region (each camera,
language, action) and entropy per layer over the episode, the first action of each predicted chunk,
the robot state if stored, success at the end, and the prompt tokens with their attention share.
Timelines: frame_index (env step = video frame) and time (seconds at 20 Hz); one entry per inference,
held until the next.

Defaults: the first episode, the last captured layer, the final captured denoise step, mean over
heads and over the action tokens (the chunk's queries, 50 for Pi0.5), heat maps renormalised within
the camera (--scale total: raw share of all attention). --heads max takes, per key, the largest head;
--heads H / --action-idx i pick one head / one action token (0 = the first action executed).
Entropy (nats, over valid keys) is the mean over heads and tokens of per-row entropies, or the
chosen head's / token's. In the viewer the image is drawn at 50% opacity over the shown heat map;
toggle heat-map layers with the eye icons in the blueprint panel; hovering shows the value (Rerun
labels it as a depth in m). Colour scale: 0 to the episode's maximum of that camera/layer/step.

modes:
  local (default)  spawn a native viewer on this machine (needs a display)
  distant          serve the recording over gRPC on --grpc-port for a remote viewer:
                     rerun --connect rerun+http://HOST:9876/proxy   (ssh -L 9876:localhost:9876 ...)
                   with --web-port P also the web viewer: open the printed http://HOST:P/?url=...
                   link (forward both ports)
  --save DIR       write DIR/<store-name>_episode_<E>.rrd (a local folder) and exit; open it with
                   'rerun FILE.rrd'

STORE_OR_URL is one store, or a study: a folder or URL holding runs, as attnstore.open_study reads
it (e.g. what attnstore eval-study wrote). --run R names the run to view: the folder holding its
attention.zarr (an unknown run is refused with the list of the study's runs); --save writes
DIR/<R>_episode_<E>.rrd.

examples:
  attnstore view outputs/eval/attention.zarr --episode 0
  attnstore view outputs/eval/attention.zarr --episode 3 --save outputs/rrd
  attnstore view outputs/eval/attention.zarr --mode distant --web-port 9090 --layers all --denoise 0 9
  attnstore view outputs/study/libero_object --run libero_object_task3 --episode 1 --save outputs/rrd

""" + URL_EPILOG.format(command="view", args=" --save rrd")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_store_argument(parser, "a store, or a study (a folder or URL holding runs; see --run)", "STORE_OR_URL")
    parser.add_argument("--run", default=None, metavar="R",
                        help="the run to view when STORE_OR_URL is a study (default: its only run)")
    parser.add_argument("--episode", type=int, default=None, help="episode index (default: the store's first)")
    parser.add_argument("--mode", choices=("local", "distant"), default="local",
                        help="local: spawn a viewer here; distant: serve gRPC for a remote viewer (default local)")
    parser.add_argument("--save", default=None, metavar="DIR",
                        help="write DIR/<store-name>_episode_<E>.rrd (DIR: a local folder) instead of showing it "
                             "(no viewer)")
    parser.add_argument("--grpc-port", type=int, default=9876, help="gRPC port of --mode distant (default 9876)")
    parser.add_argument("--web-port", type=int, default=None,
                        help="also serve the web viewer on this port (implies --mode distant)")
    parser.add_argument("--layers", nargs="+", default=["last"], metavar="L",
                        help="layers to show: last, all, or layer numbers (default: last)")
    parser.add_argument("--denoise", nargs="+", default=["final"], metavar="D",
                        help="denoise steps: final, all, or step indices, 0 = t=1.0 (default: final)")
    parser.add_argument("--heads", default="mean", metavar="mean|max|H",
                        help="mean or max over heads, or one head (default: mean)")
    parser.add_argument("--action-idx", default="mean", metavar="mean|i",
                        help="mean over the action tokens, or one token (default: mean)")
    parser.add_argument("--scale", choices=("camera", "total"), default="camera",
                        help="heat maps as share of the camera's attention (default) or of all attention")


def run(args: argparse.Namespace) -> int:
    import sys
    import time

    from attnstore.readers.view import ViewerError, ViewOptions, new_recording, open_episode, require_rerun, \
        stream_to, write_rrd

    rr = require_rerun()
    mode = "distant" if args.web_port is not None else args.mode  # the web viewer needs the gRPC server
    if args.save and mode == "distant":
        raise ViewerError("--save writes a file and exits: drop --mode distant / --web-port, or drop --save")
    if not args.save:
        check_sink(mode, args.grpc_port, args.web_port)  # before any reading
    options = ViewOptions(episode=args.episode, layers=args.layers, denoise=args.denoise, heads=args.heads,
                          action=args.action_idx, scale=args.scale)
    data = open_episode(args.store, options, run=args.run, storage_options=storage_options(args.storage_option))
    for note in data.notes:
        print(f"note: {note}", file=sys.stderr)
    what = (f"episode {data.episode} ({data.outcome}): {len(data.env_step)} inferences, cameras "
            f"{', '.join(data.cameras)}, layers {data.layers}, denoise steps {data.denoise}")
    if args.save:
        path = write_rrd(data, args.save)
        print(f"wrote {path}\n  {what}\n  open it with: rerun {path}")
        return 0
    rec = new_recording(data)
    if mode == "local":
        rec.spawn(executable_path=_viewer_executable())
        stream_to(rec, data)
        print(f"sent to the viewer: {what}")
        return 0
    # the server buffers everything for viewers that connect later: room for the episode, twice
    size = sum(4 * g[..., 0, 0].size * data.picture[0] * data.picture[1] for g in data.grids.values())
    size += sum(v.nbytes for v in (data.images or {}).values())
    url = rec.serve_grpc(grpc_port=args.grpc_port, server_memory_limit=f"{max(1024, 2 * size // 2**20)}MiB")
    if args.web_port is not None:
        from urllib.parse import quote

        try:
            rr.serve_web_viewer(web_port=args.web_port, open_browser=False, connect_to=url)
        except RuntimeError as exc:
            raise ViewerError(f"--web-port {args.web_port}: {exc}") from None
    stream_to(rec, data)
    print(f"serving {what}", flush=True)
    print(f"  native viewer: rerun --connect {url}  (from another machine: its host name for 127.0.0.1)")
    if args.web_port is not None:
        print(f"  web viewer:    http://127.0.0.1:{args.web_port}/?url={quote(url, safe='')}")
    try:  # entered before the Ctrl-C hint, so an interrupt right after it still stops cleanly
        print("  Ctrl-C to stop", flush=True)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        rec.disconnect()
        print("stopped serving", file=sys.stderr)
    return 0


def check_sink(mode: str, grpc_port: int, web_port: int | None) -> None:
    """Fail fast in one line: no display for ``local``; ports in use (or equal) for ``distant``."""
    import os
    import sys

    from attnstore.readers.view import ViewerError

    if mode == "local":
        if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
            raise ViewerError("no display for --mode local ($DISPLAY and $WAYLAND_DISPLAY are unset): write a file "
                              "with --save DIR and open it with 'rerun FILE.rrd', or serve it with --mode distant "
                              "[--web-port 9090]")
        return
    if web_port == grpc_port:
        raise ViewerError(f"--grpc-port and --web-port are both {grpc_port}: choose two different ports")
    for flag, port in (("--grpc-port", grpc_port), ("--web-port", web_port)):
        if port is not None:
            _check_port(port, flag)


def _check_port(port: int, flag: str) -> None:
    """Bind ``port`` as rerun's servers do (0.0.0.0, SO_REUSEADDR); rerun itself only logs a busy gRPC port."""
    import socket

    from attnstore.readers.view import ViewerError

    if not 0 < port < 65536:
        raise ViewerError(f"{flag} {port} is not a TCP port (1-65535)")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError as exc:
            raise ViewerError(f"{flag} {port} is in use ({exc.strerror}): stop what listens there or choose "
                              "another port") from None


def _viewer_executable() -> str | None:
    """The venv's ``rerun`` viewer when the venv is not on PATH (None: let rerun search PATH)."""
    import shutil
    import sys
    from pathlib import Path

    beside = Path(sys.executable).with_name("rerun")
    return None if shutil.which("rerun") or not beside.exists() else str(beside)
