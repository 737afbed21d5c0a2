"""Inputs and outputs of ``predict``: expand files, folders and globs; format a table, JSON, CSV or FHIR."""
from __future__ import annotations

import csv
import glob
import io
import logging
import os
import unicodedata
from pathlib import Path

from .data.dataset import _walk_images
from .fileio import display_path, json_text, printable

log = logging.getLogger("pneumonia_cnn")


def collect_paths(items) -> tuple[list[str], list[str]]:
    """Files as given, folders recursively (image and DICOM files), globs expanded; missing ones listed. A file
    named twice (``a.jpeg a.jpeg``, a glob and a folder holding it) is kept once, where first named."""
    paths, missing = _expand(items)
    unique = list({os.path.abspath(p): p for p in reversed(paths)}.values())[::-1]
    if len(unique) < len(paths):
        log.info("%d file(s) named more than once: each is read once", len(paths) - len(unique))
    return unique, missing


def _expand(items) -> tuple[list[str], list[str]]:
    paths, missing = [], []
    for item in items:
        path = Path(item)
        try:
            path.exists()
        except OSError:  # a name too long for the system: left to the reader, whose row says why
            paths.append(str(path))
            continue
        if path.is_dir():
            found, _ = _walk_images(path)
            paths += [str(p) for p in found]
        elif path.exists() or path.is_symlink():
            paths.append(str(path))
        elif any(ch in item for ch in "*?["):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                missing.append(item)
            paths += [m for m in matches if Path(m).is_file()]
        else:
            missing.append(item)
    return paths, missing


def format_predictions(predictions, fmt: str = "table", positive_class: str = "PNEUMONIA") -> str:
    rows = [p.to_dict() for p in predictions]
    if fmt == "fhir":  # the DICOM identifiers, read from the files themselves (their names may not be printable)
        from .interop.fhir import dicom_links
        links = [dicom_links(p.path) if not p.error else {} for p in predictions]
    for row in rows:
        row["path"] = display_path(row["path"])
    if fmt == "json":
        return json_text(rows)
    if fmt == "fhir":
        return format_fhir(rows, positive_class, links)
    if fmt == "csv":
        buffer = io.StringIO()
        fields = ["path", "probability", "label", "threshold", "prevalence", "in_distribution", "ood_score",
                  "warnings", "error", "model"]
        writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(dict(row, warnings="; ".join(row["warnings"])))
        return buffer.getvalue().rstrip("\n")
    for row in rows:
        row["path"] = printable(row["path"])
    width = min(max([columns(r["path"]) for r in rows] + [4]), 70)
    lines = [f"{'path':<{width}}  {'probability':>11}  {'label':<10} {'in-dist':<8} note"]
    for row in rows:
        path = _fit(row["path"], width)
        if row["error"]:
            lines.append(f"{path}  {'-':>11}  {'-':<10} {'-':<8} unreadable: {row['error']}")
            continue
        flag = {True: "yes", False: "NO", None: "?"}[row["in_distribution"]]
        lines.append(f"{path}  {row['probability']:>11.4f}  {row['label']:<10} {flag:<8} "
                     + "; ".join(row["warnings"]))
    return "\n".join(lines)


def columns(text: str) -> int:
    """Terminal columns: wide (CJK) characters take two, combining marks none."""
    return sum(0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in "WF" else 1
               for ch in text)


def _fit(text: str, width: int) -> str:
    """``text`` padded to ``width`` columns, or its end after "…" when longer."""
    if columns(text) > width:
        start = 0
        while columns(text[start:]) > width - 1:
            start += 1
        text = "…" + text[start:]
    return text + " " * (width - columns(text))


def format_fhir(rows: list[dict], positive_class: str = "PNEUMONIA", links: list[dict] | None = None) -> str:
    """A FHIR R4 DiagnosticReport with an Observation per image, checked against the FHIR models."""
    from .interop.fhir import diagnostic_report, validate
    document = diagnostic_report(rows, positive_class=positive_class, links=links)
    if not validate(document):
        log.info("FHIR output not validated: fhir.resources is not installed (pip install 'pneumonia-cnn[pacs]')")
    return json_text(document)
