"""Floor 5: the command line as a table of commands, one module per family; each command parses its flags,
calls one library function and prints. Errors are one line, never a traceback."""
from __future__ import annotations

import argparse
import contextlib
import errno
import sys
from pathlib import Path

from ..errors import OTHER_MODEL_FILES, PneumoniaCNNError
from ..fileio import OutputError, printable
from ..signals import (
    Terminated,
    end_by_sigterm,
    end_process_now,
    exit_quietly_once_done,
    quiet_interrupt_while_importing,
    sigterm_unwinds,
)

with quiet_interrupt_while_importing():  # as the package's own imports: Ctrl-C here printed a traceback
    from . import deployment, evaluation, interop, training
    from .common import PATH, setup_logging
    from .outputs import refuse_repeated_checkpoints

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
            escaped = command.help.replace("%", "%%")  # argparse expands % in help text, not in a description
            p = sub.add_parser(command.name, help=escaped, description=command.help, epilog=epilog,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
            command.arguments(p)
            p.set_defaults(func=command.run)
    return parser


def looks_like_checkpoint(item: str) -> bool:
    """``builtin``, a .pt file, or a run folder: what may come before the images."""
    path = Path(item)
    try:
        return (item == "builtin" or (path.is_file() and path.suffix in (".pt", ".pth"))
                or (path.is_dir() and ((path / "best.pt").is_file() or (path / "last.pt").is_file())))
    except OSError:  # a name too long for the system: an image path, whose row will say so
        return False




def refuse_missing_checkpoint(item: str) -> None:
    """A first argument meant as a checkpoint but not one must not fall back to the built-in model quietly:
    a ``.pt`` path that is not a file, or a run folder (it has config.json) without best.pt or last.pt."""
    from ..data.readers import SUPPORTED_SUFFIXES
    path = Path(item)
    try:
        path.exists()
    except OSError:  # not a path this system can look up: the reader says why, in that file's row
        return
    if path.suffix in (".pt", ".pth") and not path.is_file():
        from ..checkpoint import not_a_file_reason  # a FIFO or a link loop is there: say what it is
        raise PneumoniaCNNError(f"{item}: {not_a_file_reason(path)}")
    if path.suffix.lower() in OTHER_MODEL_FILES and path.is_file():  # it was read as an image, and the
        # built-in model scored the rest
        raise PneumoniaCNNError(f"{item}: {OTHER_MODEL_FILES[path.suffix.lower()]}")
    if not path.exists() and path.suffix.lower() not in SUPPORTED_SUFFIXES and not any(c in item for c in "*?["):
        # runs/typo: not quietly builtin; a link is there, but leads nowhere (it read as nothing at all)
        trouble = "" if not path.is_symlink() else " (a symbolic link loop)" if _link_loop(path) else \
            " (a symbolic link to a missing file)"
        raise PneumoniaCNNError(f"{item}: no such checkpoint, file or folder{trouble}")
    if path.is_dir() and (path / "config.json").is_file():
        raise PneumoniaCNNError(f"{item}: run folder has no best.pt or last.pt (training has not written one yet)")


def _link_loop(path: Path) -> bool:
    try:
        path.resolve(strict=True)
    except RuntimeError:  # Python 3.11's "Symlink loop"
        return True
    except OSError as error:
        return error.errno == errno.ELOOP
    return False


def refuse_checkpoints_among_images(command: str, first: str | None, paths) -> None:
    """``predict runs/a runs/b scans/`` without ``--``: runs/b's pictures were scored as X-rays (exit 0). With no
    checkpoint first (``predict scan.png runs/b``), the way to write it is the checkpoint first."""
    for path in paths:
        if looks_like_checkpoint(path):
            way = (f"for an ensemble, put -- after the checkpoints: pneumonia-cnn {command} {first} {path} -- IMAGES"
                   if first else f"give the checkpoint first: pneumonia-cnn {command} {path} IMAGES")
            raise PneumoniaCNNError(f"{path}: a checkpoint among the images; {way}")


def _split_checkpoint_and_images(args):
    """``predict [CKPT] PATH...`` and ``explain [CKPT] IMAGE...``: a leading checkpoint, else the built-in
    model; ``--`` separates several checkpoints (an ensemble) from the paths."""
    if args.command not in ("predict", "explain"):
        return args
    items = args.items
    if args.paths is not None:  # after --: the items before it are checkpoints (none: the built-in model)
        checkpoints, paths = items or ["builtin"], args.paths
    elif not items:
        raise PneumoniaCNNError(f"{args.command} needs a file, folder or glob (after an optional checkpoint)")
    elif looks_like_checkpoint(items[0]):
        checkpoints, paths = [items[0]], items[1:]
        refuse_checkpoints_among_images(args.command, items[0], paths)
    else:
        refuse_missing_checkpoint(items[0])
        checkpoints, paths = ["builtin"], items
        refuse_checkpoints_among_images(args.command, None, paths)
    if not paths:
        raise PneumoniaCNNError(f"{args.command} needs at least one file, folder or glob after the checkpoint")
    refuse_repeated_checkpoints(checkpoints, args.command)  # one model twice is no ensemble of two, as in evaluate
    args.checkpoint = checkpoints if len(checkpoints) > 1 else checkpoints[0]
    args.paths = paths
    return args


def subcommand_options(parser, command: str) -> set[str]:
    """The option strings of one sub-command (--format, -h...): after ``--`` they stay options, as before."""
    return set(_subparsers(parser)[command]._option_string_actions)


def _subparsers(parser) -> dict:
    return next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    command = next((a for a in argv if not a.startswith("-")), None)  # after global options such as -v
    if command in ("predict", "explain") and "--" in argv:  # predict A.pt B.pt -- PATHS [--format json]
        cut = argv.index("--")
        if "" in argv[cut + 1:]:  # said as for the paths before "--", not as the hidden option they become
            parser.error("argument PATH: empty; give a path")
        options = subcommand_options(parser, command)
        # a file named "-x.jpeg" would be read as an option: "./-x.jpeg" is the same file
        argv = argv[:cut] + ["--paths"] + [f"./{a}" if a.startswith("-") and a.split("=")[0] not in options else a
                                           for a in argv[cut + 1:]]
    args, extras = parser.parse_known_args(argv)
    if extras:  # predict CKPT --adapt-batch scans/: argparse leaves a path after an option unrecognized
        if getattr(args, "command", None) not in ("predict", "explain") or any(e.startswith("-") for e in extras):
            # argparse's one-line error, exit 2, with the sub-command's usage: the top-level parser's (which
            # parse_args gives) showed "pneumonia-cnn [-h] [-v] COMMAND ..." for `evaluate builtin`
            _subparsers(parser)[args.command].error(f"unrecognized arguments: {' '.join(extras)}")
        try:  # the paths' type, as for those argparse placed itself
            extras = [PATH(e) for e in extras]
        except argparse.ArgumentTypeError as error:
            parser.error(f"argument PATH: {error}")
        (args.paths if args.paths is not None else args.items).extend(extras)
    setup_logging(args.verbose)
    try:
        with sigterm_unwinds(), named_standard_output():
            status = int(args.func(_split_checkpoint_and_images(args)) or 0)
            sys.stdout.flush()  # `> /dev/full`: said here, naming standard output, not as Python exits
            return status
    except Terminated:
        print("terminated (SIGTERM)", file=sys.stderr)
        end_by_sigterm()
        return 143  # reached only if SIGTERM is blocked in this thread
    except PneumoniaCNNError as error:  # escaped: a file name in it may hold a newline or an escape sequence
        print(f"error: {printable(str(error))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): what it wanted was printed; nothing to report
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the flush at exit would fail again
        return 141
    except (ValueError, OSError) as error:
        if args.verbose and not isinstance(error, OutputError):  # a full disk is the user's to free, not a bug
            raise
        print(f"error: {printable(str(error))}", file=sys.stderr)
        return 2


class NamedStandardOutput:
    """sys.stdout while a command runs: a write that fails (a full disk behind `>`) raises OutputError naming
    standard output (it said '[Errno 28] No space left on device', naming nothing); a reader that went away
    (`| head`) stays a BrokenPipeError."""

    def __init__(self, stream):
        self.stream = stream

    def _named(self, action, *arguments):
        try:
            return action(*arguments)
        except BrokenPipeError:
            raise
        except OSError as error:
            raise OutputError(error.errno, error.strerror or str(error), "standard output") from None

    def write(self, text):
        return self._named(self.stream.write, text)

    def flush(self):
        return self._named(self.stream.flush)

    def __getattr__(self, name):
        return getattr(self.stream, name)


@contextlib.contextmanager
def named_standard_output():
    stream, sys.stdout = sys.stdout, NamedStandardOutput(sys.stdout)
    try:
        yield
    finally:
        sys.stdout = stream


def entry() -> int:
    """The ``pneumonia-cnn`` program: ``main``, then a quick exit. At interpreter exit the garbage collector
    would walk every object torch's modules made (about 0.3 s of a 2 s one-image predict); frozen, it skips
    them. Only for a process that ends here: ``main`` itself, called in-process, leaves the collector alone (and
    the signal handlers)."""
    import gc
    import os
    try:
        status = main()
    except KeyboardInterrupt:  # before the command ran (building the parser imports more): as during it
        print("interrupted", file=sys.stderr)
        status = 130
    if os.environ.get("WORLD_SIZE", "1").strip() not in ("", "1"):
        # a process torchrun started: a Gloo worker thread can still be releasing the last collective's tensors,
        # which takes the GIL; during finalisation that aborts the process ("terminate called without an active
        # exception", SIGABRT) and torchrun then fails the job (pytorch/pytorch#179291). Nothing is left to do.
        end_process_now(status)
    exit_quietly_once_done(status)
    gc.freeze()
    return status
