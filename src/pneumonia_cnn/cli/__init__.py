"""Floor 5: the command line as a table of commands, one module per family; each command parses its flags,
calls one library function and prints. Errors are one line, never a traceback."""
from __future__ import annotations

import argparse
import sys

from ..errors import PneumoniaCNNError
from . import deployment, evaluation, interop, training
from .common import setup_logging

FAMILIES = (("data and training", training), ("evaluation", evaluation), ("deployment", deployment),
            ("interoperability", interop))


def build_parser() -> argparse.ArgumentParser:
    overview = "\n".join(f"  {title}: {', '.join(c.name for c in module.COMMANDS)}" for title, module in FAMILIES)
    parser = argparse.ArgumentParser(
        prog="pneumonia-cnn", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train, evaluate, explain and serve CNNs that detect pneumonia on chest X-rays. "
                    "Research and teaching software, not a medical device.",
        epilog=f"commands:\n{overview}\n\nStart with: pneumonia-cnn demo. Each command has --help.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for _, module in FAMILIES:
        for command in module.COMMANDS:
            epilog = "examples:\n" + "\n".join(f"  {e}" for e in command.examples) if command.examples else None
            if command.name == "train":
                epilog = (epilog or "") + "\n\n" + training.presets_epilog()
            escaped = command.help.replace("%", "%%")  # argparse expands % in help text
            p = sub.add_parser(command.name, help=escaped, description=escaped, epilog=epilog,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
            command.arguments(p)
            p.set_defaults(func=command.run)
    return parser


def _split_predict_args(args):
    """``predict CKPT PATH...``: the first is the checkpoint; ``--`` separates several checkpoints."""
    if args.command != "predict":
        return args
    items = args.checkpoint
    if args.paths:
        args.checkpoint, args.paths = items, args.paths
    elif len(items) < 2:
        raise PneumoniaCNNError("predict needs a checkpoint and at least one file, folder or glob")
    else:
        args.checkpoint, args.paths = [items[0]], items[1:]
    args.checkpoint = args.checkpoint if len(args.checkpoint) > 1 else args.checkpoint[0]
    return args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "predict" and "--" in argv:  # predict A.pt B.pt -- PATHS
        cut = argv.index("--")
        argv = argv[:cut] + ["--paths"] + argv[cut + 1:]
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        return int(args.func(_split_predict_args(args)) or 0)
    except PneumoniaCNNError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as error:
        if args.verbose:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
