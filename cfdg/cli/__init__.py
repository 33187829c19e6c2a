"""The `cfdg` command: one subcommand module per job, errors printed as one line."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from cfdg import __version__
from cfdg.errors import UserError

# Subcommand name -> module defining `add_parser(subparsers)`, which sets `func` on its parser.
COMMANDS = {
    "train": "cfdg.cli.train",
    "sample": "cfdg.cli.sample",
    "grid": "cfdg.cli.grid",
    "train-evaluator": "cfdg.cli.evaluator",
    "evaluate": "cfdg.cli.evaluate",
    "sweep": "cfdg.cli.sweep",
    "demo": "cfdg.cli.demo",
}

log = logging.getLogger("cfdg")


def configure_logging(verbose: bool = False, log_file: str | None = None) -> None:
    """Send library logs to stderr (rank 0 only under torchrun) and optionally to a file."""
    rank = int(os.environ.get("RANK", "0"))
    root = logging.getLogger("cfdg")
    root.handlers.clear()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False
    if rank != 0:
        root.addHandler(logging.NullHandler())
        return
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(formatter)
    root.addHandler(stream)
    if log_file:
        os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(formatter)
        root.addHandler(file_handler)


def add_log_file(path: str) -> None:
    """Also write the `cfdg` logs to `path` (rank 0 only), for example `RUN_DIR/log.txt`."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    logging.getLogger("cfdg").addHandler(handler)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cfdg",
        allow_abbrev=False,
        description="Classifier-free diffusion guidance: train class-conditional diffusion models, "
        "sample them with guidance weight w, and measure the FID/IS trade-off.",
    )
    parser.add_argument("--version", action="version", version=f"cfdg {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the full traceback of an error (also CFDG_DEBUG=1)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMANDS.values():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            # NOTE: a subcommand whose own module is absent is left out, so that a partial
            # checkout still runs the others; a missing dependency inside it still raises.
            if err.name != module_name:
                raise
            log.debug("subcommand module %s not found", module_name)
            continue
        module.add_parser(subparsers)
    return parser


def _unreadable_file_errors() -> tuple[type[BaseException], ...]:
    """Return the exception types that mean a file or folder could not be read or written."""
    import json
    import zipfile
    import zlib

    from PIL import Image
    from safetensors import SafetensorError

    return (
        OSError,
        EOFError,
        zipfile.BadZipFile,
        zlib.error,
        json.JSONDecodeError,
        UnicodeDecodeError,
        SafetensorError,
        Image.DecompressionBombError,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    configure_logging(args.verbose)
    debug = args.debug or os.environ.get("CFDG_DEBUG") == "1"
    try:
        return int(args.func(args) or 0)
    except (UserError, FileNotFoundError) as err:
        if debug:
            raise
        print(f"cfdg {args.command}: error: {err}", file=sys.stderr)
        return 2
    except _unreadable_file_errors() as err:
        # Corrupt, truncated or misplaced files and folders end here. The message usually names
        # the file, and --debug shows where it was read or written.
        if debug:
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(
            f"cfdg {args.command}: error: {type(err).__name__}: {message} "
            "(check the file or folder named; --debug shows the traceback)",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print(f"cfdg {args.command}: interrupted", file=sys.stderr)
        return 130
