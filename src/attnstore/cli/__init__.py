"""The ``attnstore`` command: a thin dispatcher over one small module per subcommand.

Each module in this package defines ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``; heavy imports happen inside ``run`` so ``attnstore --help`` stays instant.
A module with ``RAW_ARGV = True`` (``eval``) gets its arguments unparsed, as ``run(argv)``; one with
``PASS_UNKNOWN = True`` (``eval-study``) gets the flags it does not know as ``run(args, extra)``.
Errors of type :class:`attnstore.errors.AttnStoreError` print as one line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

COMMANDS: dict[str, str] = {
    "eval": "attnstore.cli.eval",
    "inspect": "attnstore.cli.inspect",
    "export-pt": "attnstore.cli.export_pt",
    "import-pt": "attnstore.cli.import_pt",
    "overlay": "attnstore.cli.overlay",
    "plot": "attnstore.cli.plot",
    "view": "attnstore.cli.view",
    "pack": "attnstore.cli.pack",
    "eval-study": "attnstore.cli.eval_study",
    "make-tiny-policy": "attnstore.cli.make_tiny_policy",
}


def _load(name: str):
    return importlib.import_module(COMMANDS[name])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnstore",
        description="Capture, store and read LeRobot Pi0.5 attention maps (Zarr v3 + xarray).",
        epilog="Run 'attnstore COMMAND --help' for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        try:
            module = _load(name)
        except ModuleNotFoundError as exc:
            if not exc.name or not exc.name.startswith("attnstore"):
                raise
            continue  # command not built yet in this checkout
        if getattr(module, "RAW_ARGV", False):
            sub.add_parser(name, help=module.HELP, add_help=False)
            continue
        cmd = sub.add_parser(
            name,
            help=module.HELP,
            description=getattr(module, "DESCRIPTION", module.HELP),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(cmd)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from attnstore.errors import AttnStoreError

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in COMMANDS and getattr(_load(argv[0]), "RAW_ARGV", False):
            return int(_load(argv[0]).run(argv[1:]) or 0)
        if argv and argv[0] in COMMANDS and getattr(_load(argv[0]), "PASS_UNKNOWN", False):
            args, extra = build_parser().parse_known_args(argv)  # the rest goes to the jobs (eval-study)
            return int(_load(args.command).run(args, extra) or 0)
        args = build_parser().parse_args(argv)
        return int(_load(args.command).run(args) or 0)
    except AttnStoreError as exc:
        print(f"attnstore: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        if not getattr(exc, "reported", False):  # `eval` says itself what it kept
            print("attnstore: interrupted; everything committed so far stays readable", file=sys.stderr)
        end_process = getattr(exc, "end_process", None)
        if end_process is not None:
            end_process()  # `eval`: exit 130 now; lerobot's simulators cannot always shut down
        return 130
    except BrokenPipeError:  # `attnstore inspect ... | head`: the reader left; not an error of ours
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
