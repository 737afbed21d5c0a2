"""What every command family shares: the command record, logging, JSON printing, common options."""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import PneumoniaCNNError
from ..fileio import temporary_prefix


@dataclass(frozen=True)
class Command:
    """One sub-command: its name, one-line help, the options it takes, what it runs, and examples."""
    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    examples: tuple[str, ...] = ()


# Controls (C0, DEL, C1) and the Unicode line separators shown escaped: a value a sender chose (a UID, a file
# name) cannot start a forged log line
_CONTROL = {code: f"\\x{code:02x}" for code in [*range(0x20), *range(0x7F, 0xA0)]} | {
    0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t", 0x2028: "\\u2028", 0x2029: "\\u2029"}


class OneLineFormatter(logging.Formatter):
    """Each record's message on one line, whatever its arguments hold (a traceback, our own, stays readable)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return super().formatMessage(record).translate(_CONTROL)


def setup_logging(verbose: bool):
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter("%(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    for noisy in ("matplotlib", "PIL", "urllib3", "httpx", "h5py", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # the parser of uploads logs each malformed body (the client gets its 400); a library's warning is a line of
    # the log, not two lines of stderr naming a file under site-packages and quoting its source
    logging.getLogger("python_multipart").setLevel(logging.ERROR)
    warnings.showwarning = warning_line
    # Pillow's warnings are about one file each (its metadata); Python's once-per-place rule dropped all but one
    # file's, and which one it kept depended on the reading threads
    warnings.filterwarnings("always", category=UserWarning, module=r"PIL(\.|$)")


def warning_line(message, category, filename, lineno, file=None, line=None):
    """A library's warning as one line, naming the file this thread was reading when it came (if any)."""
    readers = sys.modules.get("pneumonia_cnn.data.readers")
    path = readers.file_being_read() if readers is not None else None
    if path is None:
        logging.getLogger("pneumonia_cnn").warning("warning: %s: %s", category.__name__, message)
    else:
        from ..fileio import printable
        logging.getLogger("pneumonia_cnn").warning("warning: %s: %s: %s", printable(path), category.__name__, message)


def print_json(payload):
    from ..fileio import json_text
    print(json_text(_as_text_where_unknown(payload)))


def _as_text_where_unknown(value):
    """What JSON cannot hold (a Path, a datetime) as its text, as ``default=str`` gave, NaN left to json_text."""
    if isinstance(value, dict):
        return {key: _as_text_where_unknown(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_as_text_where_unknown(item) for item in value]
    if value is None or isinstance(value, (str, int, float, bool)) or type(value).__module__ == "numpy":
        return value
    return str(value)


def add_device(parser, default: str = "auto"):
    parser.add_argument("--device", default=default, help="auto (CUDA when available), cpu, cuda or cuda:N")


def add_format(parser, choices=("table", "json"), default: str = "table"):
    parser.add_argument("--format", choices=choices, default=default, help="output format")


def add_cache_dir(parser):
    parser.add_argument("--cache-dir",  # untyped: '' means the default, as for train
                        help="where decoded arrays are cached (default: ~/.cache/pneumonia-cnn)")


def add_engine(parser):
    parser.add_argument("--engine", choices=("auto", "torch", "onnx", "onnx-int8", "openvino-int8"), default="auto",
                        help="auto: ONNX Runtime on CPUs in float32, else torch; "
                             "onnx-int8: the int8 graph built by export --format onnx-int8 (its output says int8); "
                             "openvino-int8: the same graph run by OpenVINO (pip install 'pneumonia-cnn[openvino]')")


def add_site_options(parser):
    """A site's batch: prevalence and batch-norm adaptation (see the README's "Decision" section)."""
    parser.add_argument("--prevalence", metavar="RATE|estimate",
                        help="state probabilities for this pneumonia rate (e.g. 0.3), or 'estimate' it from the "
                             "images scored together (EM); operating-point thresholds move with it")
    parser.add_argument("--adapt-batch", action="store_true",
                        help="re-estimate batch-norm statistics on the in-distribution images scored together "
                             "(AdaBN; needs one site's batch of at least 32 images)")


def whole_number(minimum: int = 1, maximum: int | None = None):
    """An argparse type: an integer in [minimum, maximum], refused at parse time with the flag named."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum or (maximum is not None and value > maximum):
            span = f"from {minimum} to {maximum}" if maximum is not None else f"of at least {minimum}"
            raise argparse.ArgumentTypeError(f"{value} is out of range: give a whole number {span}")
        return value
    return parse


def positive_number(text: str) -> float:
    """An argparse type: a finite number above 0 (seconds, megabytes)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is out of range: give a number above 0")
    return value


PORT = whole_number(1, 65535)
# resamples of the 95% intervals: their ends' Monte Carlo error falls as 1/sqrt(resamples), below the tables'
# 4 decimals long before 100,000, while the time grows with them (README, "Evaluation a reviewer would trust"):
# a larger count only ran on (99,999,999,999 was accepted and never ended)
MAX_BOOTSTRAP = 100_000
BOOTSTRAP = whole_number(1, MAX_BOOTSTRAP)
BOOTSTRAP_HELP = f"at most {MAX_BOOTSTRAP:,}: beyond, the intervals gain no digit shown, only run time"


def given(what: str):
    """An argparse type for a path (``what`` "path") or a name ("name"): an empty string is refused when parsed
    (a path of "" is the current folder: ``drift --data ''`` scored everything below it; ``--by ''`` and
    ``--layer ''`` were dropped unsaid). A name of spaces alone is refused too; a path of spaces is a real name.
    ``--split`` is left untyped: ``--split ''`` names the ``--data`` folder itself as the split, as it did."""
    def parse(text: str) -> str:
        if text == "" or (what == "name" and not text.strip()):
            raise argparse.ArgumentTypeError(f"empty; give a {what}")
        return text
    parse.__name__ = what  # argparse's "invalid path value" if anything else went wrong
    return parse


PATH, NAME = given("path"), given("name")


def inputs_read_from(item) -> tuple[list[Path], list[Path]]:
    """(files, folders) that a command reads for one argument: ``builtin`` is the packaged checkpoint; a run
    folder, or a checkpoint in one, stands for the run's own record too (``RUN_RECORDS``: its other
    checkpoint, configuration, history and the curves a report embeds); a label CSV for the images it lists;
    any other folder is read whole."""
    from .. import builtin
    if item is None:
        return [], []
    if builtin.is_builtin(item):
        return [Path(builtin.checkpoint_path())], []
    path = Path(item)
    files = [] if path.is_dir() else [path]
    run = path if path.is_dir() else path.parent if path.suffix in (".pt", ".pth") else None
    if run is not None and (run / "config.json").is_file():
        files += [run / name for name in RUN_RECORDS if (run / name).is_file()]
    elif path.is_dir():
        return [], [path]
    if path.suffix.lower() == ".csv" and path.is_file():  # a label list: the images it names are read too
        from ..data.dataset import read_csv_list
        try:
            files += map(Path, read_csv_list(path).paths)
        except Exception:  # an unreadable list is the reader's to report, after this check
            pass
    return files, []


# what training writes into a run folder and later commands read (metrics files are outputs written again)
RUN_RECORDS = ("best.pt", "last.pt", "config.json", "history.csv", "history.json", "curves.png", "calibration.png")


def _holds_images(folder: Path) -> bool:
    from ..data.readers import is_candidate_file
    return any(is_candidate_file(entry) for entry in folder.iterdir() if entry.is_file())


def check_output(out, *inputs, flag: str = "--out") -> None:
    """Before any work: ``out`` must not be one of the files the command reads (nor an image file inside the
    subfolders of a data folder it reads), must not be a folder, and its folder must be creatable: a wrong
    path fails in a second, not after the scoring, and never destroys an input."""
    from ..data.readers import SUPPORTED_SUFFIXES
    if not out:
        return
    target = Path(out)
    place = target.parent.resolve() / target.name  # where the file goes: a linked image is replaced, not followed
    for item in [i for group in inputs for i in (group if isinstance(group, (list, tuple)) else [group])]:
        files, folders = inputs_read_from(item)
        read = next((f for f in files if target.exists() and f.exists() and os.path.samefile(f, target)), None)
        if read is not None:
            what = "" if Path(item) == read else f" (read with {item})"
            raise PneumoniaCNNError(f"{out}: {flag} would overwrite {read}{what}, which this command reads; "
                                    f"choose another path")
        inside = [d for d in folders if place.is_relative_to(d.resolve())]
        # images are read from a data folder's subfolders (classes, splits): an image written there joins the data
        if target.suffix.lower() in SUPPORTED_SUFFIXES and any(place.parent != d.resolve() for d in inside):
            raise PneumoniaCNNError(f"{out}: {flag} would join the data in {item}, which this command reads; "
                                    f"choose a path outside its subfolders")
        # an image already at the top of a folder the command reads is data too (adapt --data, predict DIR)
        if target.suffix.lower() in SUPPORTED_SUFFIXES and target.is_file() and inside:
            raise PneumoniaCNNError(f"{out}: {flag} would overwrite an image in {item}, which this command reads; "
                                    f"choose another path")
        # and so is a new one beside the images at the top of a flat folder of them (adapt --data SITE)
        if target.suffix.lower() in SUPPORTED_SUFFIXES and inside and _holds_images(place.parent):
            raise PneumoniaCNNError(f"{out}: {flag} would join the images in {item}, which this command reads; "
                                    f"choose a path outside it")
    if target.is_dir():
        raise PneumoniaCNNError(f"{out}: {flag} is a folder; give a file path")
    if target.exists() and not target.is_file():  # written atomically, a device or pipe would be replaced by a file
        raise PneumoniaCNNError(f"{out}: {flag} is not a regular file (a device, pipe or socket); give a file path")
    _check_writable(out, target.parent, ("its folder", f"its folder {target.parent}"), temporary_prefix(target.name))


def check_output_folder(out, flag: str = "--out") -> None:
    """Before any work: the folder a command writes its files into must be a folder (or creatable) and take a
    file, so a wrong path (``explain --out /proc/self``) fails in a second, not after the scoring."""
    if Path(out).exists() and not Path(out).is_dir():
        raise PneumoniaCNNError(f"{out}: {flag} is a file; give a folder")
    _check_writable(out, Path(out), ("it", "this folder"), ".")


def _check_writable(out, folder: Path, names: tuple[str, str], prefix: str) -> None:
    """``folder`` created if need be, and a real test write in it; ``names``: how the messages name it. The
    folders made for the test are removed again: the output's own write makes them, so a command that then fails
    (or, as explain of unreadable images only, writes nothing) leaves no empty folder behind."""
    blocking = next((a for a in [folder, *folder.parents] if a.exists() and not a.is_dir()), None)
    if blocking is not None:
        raise PneumoniaCNNError(f"{out}: cannot create {names[0]} ({blocking} is a file)")
    made = [] if folder.is_dir() else [f for f in [folder, *folder.parents] if not f.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PneumoniaCNNError(f"{out}: cannot create {names[0]} ({error.strerror or error})") from None
    try:  # a real write, where the atomic write will make its temporary file (/proc passes os.access as root)
        handle, probe = tempfile.mkstemp(prefix=prefix, suffix=".check", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise PneumoniaCNNError(f"{out}: cannot write in {names[1]} ({error.strerror or error})") from None
    finally:
        for empty in made:  # innermost first; one something else has written into meanwhile stays
            try:
                empty.rmdir()
            except OSError:
                break
