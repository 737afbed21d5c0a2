"""Inputs and outputs of ``predict``: expand files, folders and globs; format a table, JSON, CSV or FHIR."""
from __future__ import annotations

import csv
import glob
import io
import logging
import os
import unicodedata
from pathlib import Path

from .calibration import shown_probability
from .data.dataset import _walk_images
from .fileio import display_path, json_text, printable
from .ood.checks import shown_label

log = logging.getLogger("pneumonia_cnn")


def collect_paths(items) -> tuple[list[str], list[str]]:
    """Files as given, folders recursively (image and DICOM files), globs expanded; missing ones listed. A file
    named twice (``a.jpeg a.jpeg``, a glob and a folder holding it) is kept once, where first named."""
    ordered = collect_in_order(items)
    return [path for path, absent in ordered if not absent], [path for path, absent in ordered if absent]


def collect_in_order(items) -> list[tuple[str, bool]]:
    """``collect_paths``'s files and missing names in the order named: (path, missing)."""
    kept, seen, repeated = [], set(), 0
    for path, absent in _expand(items):  # each file where first named (a dict built from the end had kept each
        # where last named)
        if not absent and os.path.abspath(path) in seen:
            repeated += 1
            continue
        if not absent:
            seen.add(os.path.abspath(path))
        kept.append((path, absent))
    if repeated:
        log.info("%d file(s) named more than once: each is read once", repeated)
    return kept


def _expand(items) -> list[tuple[str, bool]]:
    entries = []
    for item in items:
        path = Path(item)
        try:
            path.exists()
        except OSError:  # a name too long for the system: left to the reader, whose row says why
            entries.append((str(path), False))
            continue
        if path.is_dir():
            found, _ = _walk_images(path)
            entries += [(str(p), False) for p in found]
        elif path.exists() or path.is_symlink():
            entries.append((str(path), False))
        elif any(ch in item for ch in "*?["):
            matches = expand_glob(item)
            entries += [(p, False) for p in _glob_files(matches)] if matches else [(item, True)]
        else:
            entries.append((item, True))
    return entries


def _once(paths) -> list[str]:
    """Each file once (by its absolute path), where first named."""
    unique, seen = [], set()
    for path in paths:
        if os.path.abspath(path) not in seen:
            seen.add(os.path.abspath(path))
            unique.append(path)
    return unique


def _glob_files(matches) -> list[str]:
    """The files a glob's ``matches`` name: a file as it is, a folder walked as a folder given directly (its
    image and DICOM files, recursively): ``'in/d*'`` had dropped the folders ``in/dcm`` and ``in/dcm2`` it
    matched, silently. A file two matches name (``a/**`` matches ``a`` and ``a/x.jpeg``) is kept once, where
    first named."""
    found, walked = [], []
    for match in matches:
        if any(_inside(match, folder) for folder in walked):  # `scans/**` matches scans/ and all below it: the
            continue  # folder's walk has its images, in its order, and leaves the rest out, as for a folder given
        if os.path.isdir(match):
            walked.append(match)
            found += [str(p) for p in _walk_images(Path(match))[0]]
        elif os.path.isfile(match):  # a named pipe, a device or a broken link matched is left out, as before
            found.append(match)
    return _once(found)


def _inside(path: str, folder: str) -> bool:
    inner, outer = os.path.abspath(path), os.path.abspath(folder)
    return inner.startswith(outer.rstrip(os.sep) + os.sep)


def expand_glob(pattern: str) -> list[str]:
    """``sorted(glob.glob(pattern, recursive=True))``, except that ``**`` enters no folder through a symbolic
    link, as a folder's walk does not: Python 3.11's ``**`` follows them, so a link to a parent folder made
    ``loop/**/*.jpeg`` list one file 41 times, and two such links ran for ten minutes at 6 GB. Hidden folders
    are skipped and a trailing ``**`` also matches files, as glob's ``**``."""
    parts = pattern.split(os.sep)
    if "**" not in parts:
        return sorted(glob.glob(pattern))
    at = parts.index("**")
    head, rest = os.sep.join(parts[:at]) or (os.sep if at else ""), parts[at + 1:]
    found = set()
    for base in glob.glob(head) if head else [os.curdir]:
        for folder, subfolders, files in os.walk(base):  # followlinks=False: a link to a folder is not entered
            subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
            folder = folder if head else os.path.relpath(folder)  # "sub/x.jpeg", as glob gives, not "./sub/..."
            if rest:  # the rest of the pattern (another ** included) below each folder
                below = os.path.join(glob.escape(folder), *rest) if folder != os.curdir else os.path.join(*rest)
                found.update(expand_glob(below))
            else:
                found.update([folder] + [os.path.join(folder, f) for f in files if not f.startswith(".")])
    return sorted(found)


# what decided each row (engine, precision, batch adaptation, where the rate came from) is appended after the first
# ten columns, whose order readers of earlier outputs rely on
CSV_FIELDS = ["path", "probability", "label", "threshold", "prevalence", "in_distribution", "ood_score", "warnings",
              "error", "model", "engine", "precision", "batch_adapted", "batch_adaptation", "prevalence_source",
              "ood_threshold"]


def format_predictions(predictions, fmt: str = "table", positive_class: str = "PNEUMONIA") -> str:
    predictions = list(predictions)
    if fmt not in ("json", "fhir"):  # the head, then the rows: what predict prints chunk by chunk, joined
        width = table_width(p.path for p in predictions)
        return "\n".join(text for text in (format_head(fmt, width), format_rows(predictions, fmt, width)) if text)
    rows = [p.to_dict() for p in predictions]
    if fmt == "fhir":  # the DICOM identifiers, read from the files themselves (their names may not be printable)
        from .interop.fhir import dicom_links
        links = [dicom_links(p.path) for p in predictions]  # an unreadable file too, when its header reads
    for row in rows:
        row["path"] = display_path(row["path"])
    if fmt == "json":
        return json_text(rows)
    return format_fhir(rows, positive_class, links)


TABLE_PATH_COLUMNS = 120  # wide enough for an installed package's paths (the demo's rows had been misaligned at 70)


def table_width(paths) -> int:
    """The table's path column: it depends on the names alone, so rows can be printed as they are scored."""
    return min(max([columns(printable(display_path(path))) for path in paths] + [4]), TABLE_PATH_COLUMNS)


def format_head(fmt: str, width: int) -> str:
    """The first line of a CSV or table (``width``: ``table_width`` of every path the table will hold)."""
    if fmt == "csv":
        return _csv_text([], head=True)
    return f"{'path':<{width}}  {'probability':>11}  {'label':<10} {'in-dist':<8} note"


def format_rows(predictions, fmt: str, width: int) -> str:
    """CSV or table lines of ``predictions``, without the head ("" for none)."""
    rows = [p.to_dict() for p in predictions]
    for row in rows:
        row["path"] = display_path(row["path"])
    if fmt == "csv":
        return _csv_text(rows)
    lines = []
    for row in rows:
        path = _fit(printable(row["path"]), width)
        if row["error"]:
            lines.append(f"{path}  {'-':>11}  {'-':<10} {'-':<8} unreadable: {row['error']}")
            continue
        flag = {True: "yes", False: "NO", None: "?"}[row["in_distribution"]]
        shown = shown_probability(row["probability"], row["threshold"])
        lines.append(f"{path}  {shown:>11}  {shown_label(row['label']):<10} {flag:<8} " + "; ".join(row["warnings"]))
    return "\n".join(lines)


def _csv_text(rows: list[dict], head: bool = False) -> str:
    """``rows`` as CSV lines, each ended by the csv module's CRLF, less the last LF (print adds it back)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, extrasaction="ignore")
    if head:
        writer.writeheader()
    for row in rows:
        writer.writerow(dict(row, warnings="; ".join(row["warnings"]), path=spreadsheet_safe(row["path"]),
                             model=spreadsheet_safe(row["model"]), label=spreadsheet_safe(row["label"])))
    return buffer.getvalue().rstrip("\n")


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "'")


def spreadsheet_safe(text):
    """A cell a spreadsheet would run as a formula (a file named ``=HYPERLINK(...).jpeg``) after a ``'``, as OWASP
    advises; a cell that starts with ``'`` gets one more, so that no two names read alike."""
    return f"'{text}" if isinstance(text, str) and text.startswith(FORMULA_STARTS) else text


def columns(text: str) -> int:
    """Terminal columns: wide (CJK) characters take two, combining marks none."""
    return sum(0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in "WF" else 1
               for ch in text)


def _fit(text: str, width: int) -> str:
    """``text`` padded to ``width`` columns; a longer one whole, its row then wider: cut to its end, two DICOM
    exports' files (``PAT001/UID/UID/IM-0001.jpeg``, ``PAT002/...``) had shown on identical rows."""
    return text + " " * max(width - columns(text), 0)


def format_fhir(rows: list[dict], positive_class: str = "PNEUMONIA", links: list[dict] | None = None) -> str:
    """A FHIR R4 DiagnosticReport with an Observation per image, checked against the FHIR models."""
    from .interop.fhir import diagnostic_report, validate
    document = diagnostic_report(rows, positive_class=positive_class, links=links)
    if not validate(document):
        log.info("FHIR output not validated: fhir.resources is not installed (pip install 'pneumonia-cnn[pacs]')")
    return json_text(document)
