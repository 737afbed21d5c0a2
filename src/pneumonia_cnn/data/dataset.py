"""Find labelled images: Kaggle folder layout (Keras ``flow_from_directory`` semantics) or a CSV.

An ``ImageList`` is only paths, labels and patient ids; decoding happens in the cache.
"""
from __future__ import annotations

import csv
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DatasetError
from ..fileio import display_path, printable
from .readers import SUPPORTED_SUFFIXES, is_candidate_file

log = logging.getLogger(__name__)
DEFAULT_CLASS_NAMES = ("NORMAL", "PNEUMONIA")

_PERSON = re.compile(r"^(person\d+)_", re.IGNORECASE)
_NORMAL2 = re.compile(r"^(NORMAL2)-IM-(\d+)", re.IGNORECASE)
_IM = re.compile(r"^IM-(\d+)", re.IGNORECASE)


def patient_id(path) -> str:
    """Patient id from a Kaggle chest X-ray file name; the file stem when the name carries none."""
    name = Path(path).name
    for pattern, build in ((_PERSON, lambda m: m.group(1).lower()),
                           (_NORMAL2, lambda m: f"NORMAL2-{m.group(2)}"),
                           (_IM, lambda m: m.group(1))):
        match = pattern.match(name)
        if match:
            return build(match)
    return Path(name).stem


def has_patient_ids(paths) -> bool:
    return any(patient_id(p) != Path(p).stem for p in paths)


@dataclass
class ImageList:
    paths: list[str]
    labels: np.ndarray  # int64, -1 where unknown (unlabelled sets)
    patients: list[str]
    class_names: tuple[str, ...] = DEFAULT_CLASS_NAMES
    source: str = ""
    ignored: int = 0
    notes: list[str] = field(default_factory=list)

    def __len__(self):
        return len(self.paths)

    def subset(self, indices) -> ImageList:
        indices = list(indices)
        return ImageList([self.paths[i] for i in indices], self.labels[indices],
                         [self.patients[i] for i in indices], self.class_names, self.source)

    def counts(self) -> dict[str, int]:
        return {name: int((self.labels == index).sum()) for index, name in enumerate(self.class_names)}


def _walk_images(folder: Path) -> tuple[list[Path], int]:
    """Image files under ``folder`` (recursively, not following directory links, as Keras does)."""
    found, ignored = [], 0
    for directory, subdirs, files in os.walk(folder, followlinks=False, onerror=lambda e: log.warning(
            "%s: cannot list folder (%s)", display_path(e.filename), e.strerror)):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(directory) / name
            if is_candidate_file(path):
                found.append(path)
            else:
                ignored += 1
    return found, ignored


def class_folders(split_dir: Path) -> list[str]:
    """Class folder names, the positive class last: a name containing "pneumonia" (any case) after the other,
    then alphabetically without regard to case (a plain sort put ``PNEUMONIA`` before ``normal``, making the
    healthy class the positive one)."""
    names = [entry.name for entry in split_dir.iterdir() if entry.is_dir() and not entry.name.startswith(".")]
    for name in names:  # the checkpoint's rule for class names, which label every output: refused before training
        if printable(name) != name:
            raise DatasetError(f"{printable(split_dir / name)}: class folder name is not printable text (a control "
                               f"character, line break or non-UTF-8 byte); class names label every output: rename it")
    return sorted(names, key=lambda name: ("pneumonia" in name.casefold(), name.casefold(), name))


def _class_folder_names(split_dir: Path, folders: list[str], class_names: tuple) -> dict[str, str]:
    """The folder of each class, matched without regard to case as classes are sorted (a model's NORMAL read
    from `normal/`: it had been refused as not among the model's classes)."""
    found, unknown = {}, []
    for folder in folders:
        name = next((n for n in class_names if n == folder), None) or next(
            (n for n in class_names if n.casefold() == folder.casefold()), None)
        if name is None:
            unknown.append(folder)
        elif name in found:
            raise DatasetError(f"{display_path(split_dir)}: class folders {found[name]} and {folder} both name the "
                               f"class {name}; merge them into one")
        else:
            found[name] = folder
    if unknown:
        raise DatasetError(f"{display_path(split_dir)}: class folder(s) {', '.join(unknown)} not among the "
                           f"model's classes {', '.join(class_names)}")
    return found


def scan_folder(split_dir, class_names=None, require_both_classes: bool = False) -> ImageList:
    """Scan ``split_dir/<class>/...``; classes are sorted folder names unless ``class_names`` is given."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise DatasetError(f"{display_path(split_dir)}: " + ("a file, not a folder of class folders (predict takes "
                                                            "images; --data takes a folder or a CSV list)"
                                                            if split_dir.is_file() else "folder not found"))
    folders = class_folders(split_dir)
    if class_names is None:
        class_names = tuple(folders)
        if len(class_names) != 2:
            raise DatasetError(f"{display_path(split_dir)}: expected 2 class folders (e.g. NORMAL, PNEUMONIA), "
                               f"found {len(class_names)}: {', '.join(folders) or 'none'}")
    class_names = tuple(class_names)
    found = _class_folder_names(split_dir, folders, class_names)
    paths, labels, ignored, notes = [], [], 0, []
    for index, name in enumerate(class_names):
        folder = split_dir / found.get(name, name)
        if not folder.is_dir():
            notes.append(f"{display_path(folder)}: class folder missing")
            continue
        files, skipped = _walk_images(folder)
        ignored += skipped
        if not files:
            notes.append(f"{display_path(folder)}: class folder has no images")
        paths += [str(p) for p in files]
        labels += [index] * len(files)
    if not paths:
        raise DatasetError(_no_images(split_dir, class_names, [found[n] for n in class_names if n in found]))
    present = sorted(set(labels))
    if require_both_classes and len(present) < 2:
        only = class_names[present[0]]
        raise DatasetError(f"{display_path(split_dir)}: only one class has images ({only}); training needs both")
    for note in notes:
        log.warning(note)
    if ignored:
        log.info("%s: ignored %d hidden or non-image file(s)", display_path(split_dir), ignored)
    return ImageList(paths, np.asarray(labels, dtype=np.int64), [patient_id(p) for p in paths], class_names,
                     str(split_dir), ignored, notes)


def _no_images(split_dir: Path, class_names, folders) -> str:
    """Why a labelled folder gave no images: no class folder at all (images loose in it, as an unlabelled
    site's are), or class folders (``folders``, as named on disk) without images."""
    if not folders:
        loose = sum(1 for entry in split_dir.iterdir() if entry.is_file() and is_candidate_file(entry))
        found = f"; it holds {loose} image(s) directly, which carry no label" if loose else ""
        return (f"{display_path(split_dir)}: no class folders {' and '.join(class_names)} (labelled images go in "
                f"{'/, '.join(class_names)}/ under it){found}")
    present = ", ".join(f"{name}/" for name in folders)
    return (f"{display_path(split_dir)}: no images found in its class folder(s) {present} (looked for "
            f"{', '.join(sorted(SUPPORTED_SUFFIXES))})")


def scan_unlabelled(folder) -> ImageList:
    folder = Path(folder)
    if folder.is_file():
        files, ignored = [folder], 0
    elif folder.is_dir():
        files, ignored = _walk_images(folder)
    else:
        raise DatasetError(f"{display_path(folder)}: folder not found")
    if not files:
        raise DatasetError(f"{display_path(folder)}: no images found")
    paths = [str(p) for p in files]
    return ImageList(paths, np.full(len(paths), -1, dtype=np.int64), [patient_id(p) for p in paths],
                     DEFAULT_CLASS_NAMES, str(folder), ignored)


def read_csv_list(csv_path, class_names=DEFAULT_CLASS_NAMES, require_both_classes: bool = False) -> ImageList:
    """``path,label[,patient_id]`` rows; label is 0/1 or a class name; paths relative to the CSV. With a header
    row, the patient id is the column named ``patient_id`` (any other columns are ignored here); without
    one, it is the third column. Every row has the header's number of columns (without a header, the first
    row's; empty cells past it are allowed): a ragged row is refused with its line number. A class no row
    names is warned about, as a missing class folder is (or refused, with ``require_both_classes``)."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DatasetError(f"{display_path(csv_path)}: CSV file not found")
    try:
        images = _read_csv_rows(csv_path, class_names)
    except UnicodeDecodeError as error:
        raise DatasetError(f"{display_path(csv_path)}: not a text CSV (not UTF-8 at byte {error.start})") from None
    present = sorted(set(images.labels.tolist()))
    if require_both_classes and len(present) < 2:
        raise DatasetError(f"{display_path(csv_path)}: only one class has images ({class_names[present[0]]}); "
                           f"training needs both")
    for index, name in enumerate(class_names):
        if index not in present:
            images.notes.append(f"{display_path(csv_path)}: class {name} missing (no row labelled {name} or "
                                f"{index})")
            _warn_once(images.notes[-1])
    return images


CSV_PATH_HEADERS = ("path", "file", "filename", "image")


def csv_rows(csv_path: Path):
    """(line number, cells) of a CSV's rows that hold something: blank lines (empty cells only) and ``#``
    comments are skipped, and Excel's "CSV UTF-8" byte-order mark is read as one; the first row may be a
    header."""
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        for line_number, row in enumerate(csv.reader(handle), start=1):
            if any(cell.strip() for cell in row) and not row[0].strip().startswith("#"):
                yield line_number, row


NO_HEADER_COLUMNS = {"path": 0, "label": 1, "patient_id": 2}


def csv_header(row: list[str]) -> dict[str, int] | None:
    """The columns a header row names, by name ({"path": 0, "label": 2, ...}: the label was read from the
    second column whatever the header said, an earlier model's call included); None for a row of data."""
    header = [cell.strip().lower() for cell in row]
    path = next((index for index, name in enumerate(header) if name in CSV_PATH_HEADERS), None)
    if path is None:
        return None
    return {"path": path, **{name: header.index(name) for name in ("label", "patient_id") if name in header}}


def _same_file_key(path: Path) -> str:
    """One key per file however a row spells it (relative, absolute, through a link)."""
    try:
        return str(Path(path).resolve())
    except (OSError, RuntimeError):  # a name too long to look up, a link loop (RuntimeError before Python 3.13):
        # the row is kept, and skipped with the reader's reason when it is read, as a folder's loop is
        return os.path.normpath(os.path.abspath(path))


_WARNED: set[str] = set()


def _warn_once(message: str):
    """A CSV is read by the output checks before the run reads it: its warning is said once."""
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning("%s", message)


def _read_csv_rows(csv_path: Path, class_names) -> ImageList:
    paths, labels, patients, seen, repeated = [], [], [], {}, 0
    columns, width = NO_HEADER_COLUMNS, None
    for index, (line_number, row) in enumerate(csv_rows(csv_path)):
        header = csv_header(row) if index == 0 else None
        if header is not None:
            if "label" not in header:
                raise DatasetError(f"{display_path(csv_path)}:{line_number}: the header names no label column "
                                   f"(it has {', '.join(cell.strip() for cell in row)}); name the column of 0/1 or "
                                   f"class names 'label'")
            columns, width = header, (len(row), "the header has")
            continue
        width = width or (3, "path,label[,patient_id] has")  # no header: the documented columns
        _check_width(csv_path, line_number, row, width)
        path, label = _csv_row(csv_path, line_number, row, class_names, columns)
        first = seen.setdefault(_same_file_key(path), (line_number, label))
        if first[1] != label:  # one image counted once as each class: no metric means anything then
            raise DatasetError(f"{display_path(csv_path)}:{line_number}: {display_path(path)} is labelled "
                               f"{label}, but {first[1]} at line {first[0]}")
        if first[0] != line_number:  # listed twice: counted twice it inflated every count and narrowed intervals
            repeated += 1
            continue
        paths.append(str(path))
        labels.append(label)
        patient_column = columns.get("patient_id")
        given = row[patient_column].strip() if patient_column is not None and len(row) > patient_column else ""
        patients.append(given or patient_id(path))
    if repeated:
        _warn_once(f"{display_path(csv_path)}: {repeated} row(s) name an image listed before: each image is "
                   "counted once")
    if not paths:
        raise DatasetError(f"{display_path(csv_path)}: CSV lists no images")
    return ImageList(paths, np.asarray(labels, dtype=np.int64), patients, tuple(class_names), str(csv_path))


def _check_width(csv_path: Path, line_number: int, row: list[str], width: tuple[int, str]) -> None:
    """A row with more cells than its columns (a comma in an unquoted name) would shift what its cells mean;
    a short row only leaves its last cells empty (an optional patient_id), and cells past the last may be empty
    (spreadsheets add them)."""
    expected, where = width
    if any(cell.strip() for cell in row[expected:]):
        raise DatasetError(f"{display_path(csv_path)}:{line_number}: {len(row)} column(s), but {where} {expected} "
                           f"(a ragged row; quote a name that holds a comma)")


def _csv_row(csv_path: Path, line_number: int, row: list[str], class_names, columns: dict) -> tuple[Path, int]:
    if len(row) <= max(columns["path"], columns["label"]):
        raise DatasetError(f"{display_path(csv_path)}:{line_number}: expected path,label[,patient_id]")
    if not row[columns["path"]].strip():  # it was skipped as a blank line, unsaid
        raise DatasetError(f"{display_path(csv_path)}:{line_number}: no path (its path cell is empty)")
    raw_label = row[columns["label"]].strip()
    by_case = [name for name in class_names if name.casefold() == raw_label.casefold()]
    if raw_label in class_names or len(by_case) == 1:  # `normal` as class folders are matched
        label = class_names.index(raw_label if raw_label in class_names else by_case[0])
    elif raw_label in ("0", "1"):
        label = int(raw_label)
    else:
        raise DatasetError(f"{display_path(csv_path)}:{line_number}: label {raw_label!r} is not 0, 1 or "
                           f"one of {', '.join(class_names)}")
    path = Path(row[columns["path"]].strip())
    return (path if path.is_absolute() else csv_path.parent / path), label


def evaluated_name(data, split: str | None) -> str:
    """What was evaluated, in words: the split of a Kaggle-layout root, else the CSV's or the folder's own name
    (a CSV or a flat folder had been called "test", which it has none of)."""
    if not data:
        return split or ""
    data = Path(data)
    if data.suffix.lower() != ".csv" and split and (data / split).is_dir() and \
            os.path.normpath(data / split) != os.path.normpath(data):  # --split . is the folder itself: its name
        return split
    return data.name or str(data)


def load_split(data, split: str | None, class_names=None, require_both_classes=False) -> ImageList:
    """``data`` is a Kaggle-layout root (with ``split``), a split folder itself, or a CSV file."""
    data = Path(data)
    if data.suffix.lower() == ".csv":
        return read_csv_list(data, class_names or DEFAULT_CLASS_NAMES, require_both_classes)
    if not data.exists():
        raise DatasetError(f"{display_path(data)}: folder not found")
    if split and (data / split).is_dir():
        return scan_folder(data / split, class_names, require_both_classes)
    if split and not (data / split).exists():
        splits = [name for name in ("train", "val", "test") if (data / name).is_dir()]
        refuse_split_in_other_case(data, split)
        if splits:  # a Kaggle-layout root without this split: say so, not that its splits are odd classes
            raise DatasetError(f"{display_path(data / split)}: folder not found (the splits there: "
                               f"{', '.join(splits)})")
    return scan_folder(data, class_names, require_both_classes)


def refuse_split_in_other_case(data: Path, split: str) -> None:
    """A missing ``split`` folder of ``data`` whose name is there in other letter case (``Train/`` on a
    case-sensitive system) is refused: read as absent, a ``VAL/`` was silently replaced by a carve of train."""
    other_case = None if (Path(data) / split).exists() else _split_in_other_case(Path(data), split)
    if other_case:
        raise DatasetError(f"{display_path(Path(data) / split)}: folder not found; {other_case}/ is there, but split "
                           f"folders are lower-case (train, val, test): rename it {split}/")


def _split_in_other_case(data: Path, split: str) -> str | None:
    """The name of a folder in ``data`` that is ``split`` in other letter case (``Train``), or None."""
    try:
        return next((entry.name for entry in sorted(data.iterdir()) if entry.name.lower() == split
                     and entry.name != split and entry.is_dir()), None)
    except OSError:
        return None


def patient_split(images: ImageList, fraction: float, seed: int = 0) -> tuple[ImageList, ImageList]:
    """Split by patient, stratified by the patient's label, so that no patient is on both sides."""
    if not 0 < fraction < 1:
        raise DatasetError(f"--val-from-train must be between 0 and 1, got {fraction}")
    rng = np.random.default_rng(seed)
    patient_label: dict[str, int] = {}
    for patient, label in zip(images.patients, images.labels):
        patient_label[patient] = max(patient_label.get(patient, 0), int(label))
    held_out: set[str] = set()
    for label in sorted(set(patient_label.values())):
        group = sorted(p for p in patient_label if patient_label[p] == label)
        rng.shuffle(group)
        target = fraction * sum(1 for p in images.patients if patient_label[p] == label)
        taken = 0
        counts = {}
        for p in images.patients:
            counts[p] = counts.get(p, 0) + 1
        for patient in group:
            if taken >= target:
                break
            held_out.add(patient)
            taken += counts[patient]
    train_idx = [i for i, p in enumerate(images.patients) if p not in held_out]
    val_idx = [i for i, p in enumerate(images.patients) if p in held_out]
    train, val = images.subset(train_idx), images.subset(val_idx)
    train.source = images.source + f" (train part, {1 - fraction:.0%} of patients' images)"
    val.source = images.source + f" (val part carved by patient, {fraction:.0%})"
    return train, val
