"""A command's set of outputs (``evaluate``'s JSON and its figures folder; ``report``'s page, metrics JSON and
figures) written beside where they go, then put in place together in one short step during which SIGINT and
SIGTERM wait. An interrupt or a failure before that step leaves the previous set whole (the JSON was written
first, then the pictures one by one, then the JSON again: Ctrl-C left a new JSON beside the previous run's
pictures); one during it takes effect once the new set is in place. Only a SIGKILL mid-step can mix them.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from pathlib import Path

from ..errors import PneumoniaCNNError
from ..fileio import OutputError, display_path, output_error, temporary_prefix
from ..signals import signals_deferred  # noqa: F401  # staging.signals_deferred, as before

FIGURE_NAMES = ("roc", "pr", "confusion", "reliability", "histogram", "mistakes")  # figures.evaluation_figures's
FIGURE_FILES = frozenset(f"{name}.png" for name in FIGURE_NAMES)


FIGURE_TITLE = "pneumonia-cnn evaluate"  # stored in each figure: a later evaluate knows it as its own


def check_figures_folder(folder, figures: bool) -> None:
    """Before any work, with ``figures``: the figures folder an output JSON names (``figures_folder``) receives
    the new pictures (files of other names in it stay), so anything but a folder there is refused, and so is a
    file of a figure's name that is not a picture evaluate drew (an X-ray saved there as ``roc.png`` had been
    replaced without a word): a PNG carrying ``FIGURE_TITLE``, or made by matplotlib (earlier versions drew
    them untitled, and ``test.json`` and ``test_metrics.json`` share ``test_figures/``)."""
    folder = Path(folder)
    if not figures or not os.path.lexists(folder):
        return
    if folder.is_symlink() or not folder.is_dir():
        raise PneumoniaCNNError(f"{display_path(folder)}: exists and is not a figures folder (the pictures go "
                                f"there); remove it, give --no-figures, or give another --out")
    for picture in sorted(folder / name for name in FIGURE_FILES):
        if picture.is_dir() and not picture.is_symlink():  # as the final step would say, but before any work
            raise OutputError(21, "a folder is there, where the file goes", str(picture))
        if os.path.lexists(picture) and not _drawn_by_evaluate(picture):
            raise PneumoniaCNNError(f"{display_path(picture)}: holds a file evaluate did not write (its "
                                    f"{picture.stem} figure goes there); remove it, give --no-figures, or give "
                                    f"another --out")


def _drawn_by_evaluate(picture: Path) -> bool:
    """A PNG whose text chunks, before its pixels, hold ``FIGURE_TITLE`` or matplotlib's name."""
    try:
        with open(picture, "rb") as handle:
            head = handle.read(1 << 16)
    except OSError:  # a link loop, unreadable: not evaluate's
        return False
    return head.startswith(b"\x89PNG\r\n\x1a\n") and (FIGURE_TITLE.encode("ascii") in head
                                                       or b"tEXtSoftware\x00Matplotlib" in head)


def folders_read(data, splits=()) -> list[tuple[Path, Path]]:
    """(as named, with links followed) for each folder whose images a command reads below ``data``: when the split
    read (the first of ``splits``) is a folder there, the split folders of that Kaggle-layout root (train, val,
    test and ``splits``); else ``data`` itself, a split folder or a flat folder of images (``--split ''`` too);
    none for a CSV (it lists its images) or a path that is not a folder."""
    try:
        root = Path(data)
        if not root.is_dir():
            return []
        if not (splits and splits[0] and (root / splits[0]).is_dir()):  # --data is the split folder itself
            return [(root, root.resolve())]
        names = [name for name in dict.fromkeys(("train", "val", "test", *splits)) if name]
        return [(root / name, (root / name).resolve()) for name in names if (root / name).is_dir()]
    except (OSError, RuntimeError):  # a link loop, a name too long: reading the data says why
        return []


def refuse_outputs_in_data(out, data, splits=(), command: str = "evaluate", flag: str = "--out",
                           what: str = "the metrics JSON and its figures") -> None:
    """Before any scoring: an output written into a folder the command reads joins the data. evaluate's
    ``m_figures/*.png`` in test/NORMAL were scored as X-rays by the next run (exit 0); in test/ itself they made a
    class folder the model does not know, and every later evaluate failed. The top of a Kaggle-layout root,
    beside its splits, is not read (train allows a run folder there too)."""
    if not out or not data:
        return
    try:
        place = Path(out).parent.resolve()
    except (OSError, RuntimeError):  # the write names the reason
        return
    inside = next((named for named, folder in folders_read(data, splits) if place.is_relative_to(folder)), None)
    if inside is not None:
        raise PneumoniaCNNError(f"{out}: {flag} is inside {display_path(inside)}, which {command} reads ({what} "
                                f"would join the images, read as X-rays next time); choose a path outside it")


def pictures_of(out, folder) -> list[Path]:
    """The pictures the JSON at ``out`` (the result being replaced) lists in ``folder``: with ``--no-figures``
    they would stay beside a new JSON they do not describe. Only those: another result sharing the folder's
    name (``test.json`` and ``test_metrics.json`` both draw into ``test_figures/``) keeps its own, and a folder
    of the user's files is never touched."""
    import json
    try:
        listed = json.loads(Path(out).read_text(encoding="utf-8")).get("figures") or {}
        paths = [Path(value) for value in listed.values()]
    except (OSError, ValueError, AttributeError, TypeError):  # none, or not an earlier evaluate's JSON
        return []
    folder = Path(folder)
    return [path for path in paths if path.name in FIGURE_FILES and path.parent == folder and path.is_file()
            and not path.is_symlink()]


def _umask() -> int:
    current = os.umask(0o022)
    os.umask(current)
    return current


class Staged:
    """Outputs written beside their places (``text``, ``folder``), put there by ``commit``; as a context
    manager, committed when the block ends without an exception, and the temporary files removed either way."""

    def __init__(self):
        self.files: dict[Path, Path] = {}  # final path -> temporary file beside it
        self.folders: dict[Path, Path] = {}  # final folder -> temporary folder beside it
        self.removed: list[Path] = []  # an earlier result's pictures (``pictures_of``)

    def text(self, path, text: str) -> None:
        path = Path(path)
        if path not in self.files:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                handle, temporary = tempfile.mkstemp(prefix=temporary_prefix(path.name), suffix=".tmp",
                                                     dir=path.parent)
            except OSError as error:
                raise output_error(error, path) from None
            os.close(handle)
            self.files[path] = Path(temporary)
        try:
            self.files[path].write_text(text, encoding="utf-8")
        except OSError as error:  # named by the output's own path, not the temporary file's
            raise output_error(error, path) from None

    def folder(self, path) -> Path:
        """A temporary folder beside ``path`` whose files go into ``path`` on commit."""
        path = Path(path)
        if path not in self.folders:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                self.folders[path] = Path(tempfile.mkdtemp(prefix=temporary_prefix(path.name), suffix=".tmp",
                                                           dir=path.parent))
            except OSError as error:
                raise output_error(error, path) from None
        return self.folders[path]

    def final(self, error: OutputError) -> OutputError:
        """``error`` naming a temporary file, or a file of a temporary folder: the same, naming its own place."""
        for final, temporary in self.files.items():
            if error.filename and Path(error.filename) == temporary:
                return OutputError(error.errno, error.strerror, str(final))
        for final, temporary in self.folders.items():
            if error.filename and Path(error.filename).parent == temporary:
                return OutputError(error.errno, error.strerror, str(final / Path(error.filename).name))
        return error

    def remove_pictures(self, paths) -> None:
        self.removed.extend(Path(path) for path in paths)

    def staged(self, path) -> Path:
        """Where ``path``'s new content is until the commit (the report embeds the pictures it has drawn)."""
        path = Path(path)
        if path in self.files:
            return self.files[path]
        return self.folders[path.parent] / path.name if path.parent in self.folders else path

    def commit(self) -> None:
        for final, temporary in self.files.items():  # to disk before any rename: the step itself only renames
            try:
                with open(temporary, "rb") as written:
                    os.fsync(written.fileno())
            except OSError as error:
                raise output_error(error, final) from None
        self._check_places()
        with signals_deferred():
            try:
                for final, temporary in self.folders.items():
                    _place_folder(temporary, final)
                for picture in self.removed:
                    _remove_picture(picture)
                for final, temporary in self.files.items():
                    os.chmod(temporary, _mode_for(final))
                    os.replace(temporary, final)
            except OSError as error:  # named by the output's own path, not a temporary one
                raise self.final(output_error(error, Path(error.filename or "?"))) from None
        self.files, self.folders, self.removed = {}, {}, []

    def _check_places(self) -> None:
        """Before the step: each place can take its output (a folder where a picture or the JSON goes had failed
        midway, leaving a mix of old and new pictures and an error naming a temporary file)."""
        places = [*self.files, *(final / entry.name for final, temporary in self.folders.items()
                                 if os.path.isdir(final) for entry in temporary.iterdir())]
        for place in places:
            if os.path.isdir(place) and not os.path.islink(place):
                raise OutputError(21, "a folder is there, where the file goes", str(place))

    def discard(self) -> None:
        for temporary in self.files.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
        for temporary in self.folders.values():
            shutil.rmtree(temporary, ignore_errors=True)
        self.files, self.folders, self.removed = {}, {}, []

    def __enter__(self):
        return self

    def __exit__(self, kind, *_):
        try:
            if kind is None:
                self.commit()
        finally:
            self.discard()  # nothing left after a commit; the temporary files after a failure or an interrupt


def _mode_for(path: Path) -> int:
    """The mode a plain write would give: an existing file's own, a new file's from the umask."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return 0o666 & ~_umask()


def _place_folder(temporary: Path, final: Path) -> None:
    """A new folder is renamed into place; into one already there, each picture is (its other files stay)."""
    if not os.path.lexists(final):
        os.chmod(temporary, 0o777 & ~_umask())  # not mkdtemp's 0700
        os.rename(temporary, final)
        return
    for entry in sorted(temporary.iterdir()):
        os.replace(entry, final / entry.name)
    temporary.rmdir()


def _remove_picture(picture: Path) -> None:
    """An earlier result's picture, and its folder once nothing else is there."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(picture)
    with contextlib.suppress(OSError):  # not empty: other files stay
        picture.parent.rmdir()
