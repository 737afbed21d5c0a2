"""What a command may replace, checked before any work: an output file that already exists must be the command's
own kind of output (a checkpoint for ``adapt --out`` and ``evaluate --save-as``, evaluate's metrics JSON, stress's
JSON, report's HTML, given or by default, show-samples' picture), never anything else (an X-ray, another run's
configuration) and never a training run's own file (best.pt, last.pt, config.json, history, test_metrics.json) nor
the built-in model's. A command's own earlier output is replaced, so the same command runs again. And a checkpoint
is one member of an ensemble once only."""
from __future__ import annotations

import glob
import json
import os
import zipfile
from pathlib import Path

from ..errors import PneumoniaCNNError

_JSON_LIMIT = 1 << 30  # a larger "metrics" file is not one a command wrote: not parsed, not replaced


def _checkpoint_pickle(path: Path) -> bytes | None:
    """The start of the pickle of a file ``torch.save`` wrote (read without unpickling), or None: a TorchScript
    model (its code inside), a tensor or a zip of something else is not one."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            pickled = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pickled) != 1 or any("/code/" in n for n in names):
                return None
            return archive.open(pickled[0]).read(64 << 20)
    except (OSError, zipfile.BadZipFile, ValueError, RuntimeError):
        return None


def _is_checkpoint(path: Path) -> bool:
    """A file ``torch.save`` wrote of a checkpoint's fields."""
    head = _checkpoint_pickle(path)
    return head is not None and b"state_dict" in head and b"preprocessing" in head


def _json_value(path: Path, opening: bytes):
    """The JSON in ``path`` when it begins with ``opening`` (``{`` or ``[``), else None: an image or a zip is not
    read whole, nor a file over ``_JSON_LIMIT``."""
    try:
        if path.stat().st_size > _JSON_LIMIT:
            return None
        with open(path, "rb") as handle:
            if handle.read(64).lstrip()[:1] != opening:
                return None
        return json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None


def _json_fields(path: Path) -> set:
    value = _json_value(path, b"{")
    return set(value) if isinstance(value, dict) else set()


def _is_report(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            head = handle.read(512)
    except OSError:
        return False
    return head.lower().startswith(b"<!doctype html>") and b"<title>pneumonia-cnn report" in head


def report_page_of(metrics) -> Path | None:
    """The report page whose metrics JSON ``metrics`` is, or None: ``report --out R.html`` writes
    R_SPLIT_metrics.json beside R.html (``report_paths``: R.htm, or R alone, too), so a file named so beside a
    pneumonia-cnn report is that report's (its split may hold underscores, and so may R)."""
    path = Path(metrics)
    stem = path.name.removesuffix("_metrics.json")
    if stem == path.name:
        return None
    for index in [index for index, char in enumerate(stem) if char == "_" and 0 < index < len(stem) - 1]:
        page = stem[:index]
        try:
            found = [path.parent / page, *sorted(path.parent.glob(f"{glob.escape(page)}.*"))]
            found = next((f for f in found if f.stem == page or f.name == page if f.is_file() and _is_report(f)), None)
        except OSError:  # an unreadable folder: no report found there
            return None
        if found is not None:
            return found
    return None


def _is_picture(path: Path, head: bytes) -> bool:
    """Whether ``path`` (beginning with ``head``) is a picture of a format show-samples stores its title in: a
    PNG, JPEG or TIFF that Pillow knows (it reads the header, not the pixels), a PDF, or an SVG: XML whose root
    element is <svg>. A text file that merely names the title is none of them."""
    if head.startswith(b"%PDF-"):
        return True
    if head.lstrip()[:1] == b"<":
        return _root_is_svg(head)
    from PIL import Image
    try:
        with Image.open(path, formats=["PNG", "JPEG", "TIFF"]):
            return True
    except Exception:  # a damaged or foreign file raises whatever its format's reader raises
        return False


def _root_is_svg(head: bytes) -> bool:
    """The first element of the XML in ``head`` (the file's first 64 KiB, where an SVG's root element is)."""
    import xml.etree.ElementTree as ElementTree
    parser = ElementTree.XMLPullParser(events=("start",))
    try:
        parser.feed(head)
        first = next((element for _, element in parser.read_events()), None)
    except ElementTree.ParseError:
        return False
    return first is not None and first.tag.rsplit("}", 1)[-1] == "svg"


def _is_samples(path: Path) -> bool:
    """A picture ``show-samples`` wrote: its title (``plots.SAMPLES_TITLE``) is near the start of a PNG, JPEG,
    TIFF or SVG and in the trailer of a PDF, so only the first and last 64 KiB are read."""
    from ..plots import SAMPLES_TITLE
    try:
        with open(path, "rb") as handle:
            head = handle.read(1 << 16)
            handle.seek(max(handle.seek(0, os.SEEK_END) - (1 << 16), 0))
            tail = handle.read()
    except OSError:
        return False
    return SAMPLES_TITLE.encode("ascii") in head + tail and _is_picture(path, head)


# kind: (how a message names it, whether an existing file is one)
KINDS = {
    "checkpoint": ("a checkpoint", _is_checkpoint),
    "metrics": ("evaluate's metrics JSON", lambda p: {"data", "split", "metrics"} <= _json_fields(p)),
    "stress": ("stress's JSON", lambda p: {"checkpoint", "data", "split", "baseline", "shifts"} <= _json_fields(p)),
    "report": ("a pneumonia-cnn HTML report", _is_report),
    "samples": ("a show-samples picture", _is_samples),
}


# the columns every row of a run's history has begun with since the first version (training/loop.py's
# write_history): a user's own history.csv (a spreadsheet, another tool's log) has other ones
_HISTORY_COLUMNS = ("epoch", "train_loss", "train_accuracy")


def _is_run_history_csv(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            header = handle.readline(4096)  # the column names only: a huge CSV is not read
    except OSError:
        return False
    return header.decode("utf-8", "replace").strip().split(",")[:len(_HISTORY_COLUMNS)] == list(_HISTORY_COLUMNS)


def _is_run_history_json(path: Path) -> bool:
    rows = _json_value(path, b"[")
    return isinstance(rows, list) and bool(rows) and all(isinstance(row, dict) and set(_HISTORY_COLUMNS) <= set(row)
                                                         for row in rows)


def _is_run_last_checkpoint(path: Path) -> bool:
    """train's last.pt: a checkpoint with the training state to resume from (adapt and evaluate --save-as drop it,
    so no other command writes one)."""
    head = _checkpoint_pickle(path)
    return head is not None and b"state_dict" in head and b"training_state" in head


def run_folder_of(path: Path) -> bool:
    """Whether ``path``'s folder is a training run's: it holds a config.json, history or last.pt that train wrote
    (judged by their content: a file that merely has such a name, like a user's history.csv, makes no run)."""
    from ..training.setup import is_run_config
    folder = path.parent
    return (is_run_config(folder / "config.json") or _is_run_history_csv(folder / "history.csv")
            or _is_run_history_json(folder / "history.json") or _is_run_last_checkpoint(folder / "last.pt"))


def refuse_builtin_folder(out, flag: str = "--out") -> None:
    """Nothing is written among the built-in model's files (an installation's, shared by every user)."""
    from .. import builtin
    path = Path(out)
    try:
        place = path.parent.resolve() / path.name
        packaged = place.is_relative_to(Path(builtin.checkpoint_path()).resolve().parent)
    except (OSError, RuntimeError):  # a name too long, a link loop: the write names the reason
        return
    if packaged:
        raise PneumoniaCNNError(f"{out}: {flag} is inside the built-in model's package folder; choose another path")


def check_replaceable(out, kind: str, flag: str = "--out") -> None:
    """Before any work: ``out`` is new, empty (mktemp's), or the command's own ``kind`` of output; never a file
    of a training run (``RUN_FILES``, even one not yet there: best.pt beside a run's config.json is the run's) or
    of the built-in model (evaluate's default RUN/test_metrics.json, beside its own model, is not checked here:
    ``keep_other_metrics`` guards it)."""
    from ..training.setup import RUN_FILES
    if not out:
        return
    path = Path(out)
    refuse_builtin_folder(out, flag)
    try:
        run_file = path.name in RUN_FILES and run_folder_of(path)
        present = path.is_file() and path.stat().st_size > 0
    except (OSError, RuntimeError):  # a name too long, a link loop: the write names the reason
        return
    if run_file:
        raise PneumoniaCNNError(f"{out}: {flag} would replace the {path.name} of the training run in {path.parent} "
                                f"(a run's own files are not replaced); choose another path")
    name, holds = KINDS[kind]
    if present and not holds(path):
        raise PneumoniaCNNError(f"{out}: exists and is not {name} ({flag} would replace it); choose another path, "
                                f"or remove it")


def checkpoint_file(item: str) -> Path | None:
    """The file a checkpoint argument loads: builtin's, a run folder's best.pt (else last.pt), or the file."""
    from .. import builtin
    if builtin.is_builtin(item):
        return Path(builtin.checkpoint_path())
    path = Path(item)
    if path.is_dir():
        path = path / "best.pt" if (path / "best.pt").is_file() else path / "last.pt"
    return path if path.is_file() else None


def refuse_missing_checkpoints(items) -> None:
    """A checkpoint that is not there is said first: before the checks of where the outputs would go, whose
    refusal ("the default --out is inside the folder read") would send the user after the wrong problem."""
    from .. import builtin
    from ..fileio import not_a_file_reason
    for item in items:
        if not builtin.is_builtin(str(item)) and not Path(item).exists():
            raise PneumoniaCNNError(f"{item}: {not_a_file_reason(item)}")


def refuse_repeated_checkpoints(items, flag: str = "--checkpoint") -> None:
    """Two arguments that load the same file (``run1 run1``, ``run1 run1/best.pt``, a link to it) would be an
    "ensemble of 2" of one model, reported as two: refused in one line."""
    seen = {}
    for item in items:
        try:
            found = checkpoint_file(str(item))
            key = None if found is None else (found.stat().st_dev, found.stat().st_ino)
        except OSError:  # unreadable: loading it says why
            continue
        if key is None:
            continue
        if key in seen:
            twice = "it twice" if os.path.normpath(str(seen[key])) == os.path.normpath(str(item)) else \
                f"the file {seen[key]} loads ({found}) again"
            raise PneumoniaCNNError(f"{item}: {flag} names {twice}; give each model once")
        seen[key] = item
