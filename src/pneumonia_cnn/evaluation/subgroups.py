"""Results by subgroup (``evaluate --by FIELD``): every metric with its 95% interval in each group, and the
largest gap between groups.

A field is a DICOM attribute read from each file's header (PatientSex, ViewPosition, Manufacturer,
InstitutionName, BodyPartExamined...), ``AgeBand`` (from the DICOM PatientAge, or a CSV ``age`` column in
years), or any column of a CSV input (matched by its header name, case-insensitively). Images without a value
form the group ``(missing)``, which is shown but left out of the gaps. Intervals come from the same seeded,
class-stratified bootstrap as the overall metrics (by patient when file names carry patient ids); a group
with one class only has no ROC AUC, sensitivity or specificity to report (NaN) and is left out of those gaps.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..data.dataset import csv_header, csv_rows, has_patient_ids
from ..errors import PneumoniaCNNError
from ..fileio import display_path
from .metrics import FEW_PER_CLASS, bootstrap_metrics, decided_positive, units_per_class

MISSING = "(missing)"
AGE_FIELDS = {"ageband", "age_band", "agegroup", "age_group"}
AGE_BANDS = ((1, "<1y"), (6, "1-5y"), (18, "6-17y"), (40, "18-39y"), (65, "40-64y"), (math.inf, "65y+"))
AGE_UNITS = {"D": 365.25, "W": 52.1775, "M": 12.0, "Y": 1.0}
METRICS = ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "roc_auc", "pr_auc",
           "brier", "log_loss", "ece")
LOWER_IS_BETTER = {"brier", "log_loss", "ece"}


def age_years(text) -> float | None:
    """DICOM AS (``003Y``, ``018M``, ``006W``, ``010D``) or a plain number of years; None if neither."""
    text = str(text or "").strip().upper()
    if not text:
        return None
    unit = text[-1] if text[-1] in AGE_UNITS else "Y"
    try:
        return float(text.rstrip("DWMY")) / AGE_UNITS[unit]
    except ValueError:
        return None


def age_band(years: float | None) -> str:
    if years is None:
        return MISSING
    return next(name for upper, name in AGE_BANDS if years < upper)


def csv_columns(data) -> dict[str, dict[str, str]] | None:
    """A CSV input's columns by header name (lower case): {column: {resolved path: value}}; None otherwise."""
    data = Path(data)
    if data.suffix.lower() != ".csv" or not data.is_file():
        return None
    rows = [row for _, row in csv_rows(data)]  # as the images were read: blank lines, comments, a BOM
    found = csv_header(rows[0]) if rows else None  # columns by name, as the images were read (by position, a
    if found is None:  # `label,path,sex` header was dropped and a `label,path,age` one gave no ages, unsaid)
        return {}
    header = [name.strip().lower() for name in rows[0]]
    columns = {name: {} for name in header}
    for row in rows[1:]:
        path = Path(row[found["path"]].strip())
        key = str((path if path.is_absolute() else data.parent / path).resolve())
        for name, value in zip(header, row):
            columns[name].setdefault(key, value.strip())  # the first row of an image listed twice, as it is read
    return columns


def dicom_values(paths, keyword: str) -> list[str | None]:
    """One attribute of each file's DICOM header (pixels are not read); None for other files."""
    import pydicom
    values = []
    for path in paths:
        try:
            dataset = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=[keyword])
            value = getattr(dataset, keyword, None)
        except Exception:  # noqa: BLE001 - a JPEG or a broken header simply has no value for this field
            value = None
        values.append(str(value).strip() or None if value is not None else None)
    return values


def field_values(paths, field: str, data) -> list[str]:
    """The group of each image for ``field`` (see the module's docstring)."""
    from pydicom.datadict import tag_for_keyword
    columns = csv_columns(data) or {}
    keys = [str(Path(p).resolve()) for p in paths]
    name = field.strip().lower()
    if name in AGE_FIELDS:
        ages = columns.get("age") or columns.get("patientage")
        raw = [ages.get(k) for k in keys] if ages else dicom_values(paths, "PatientAge")
        return [age_band(age_years(value)) for value in raw]
    if name in columns:
        return [columns[name].get(k) or MISSING for k in keys]
    if tag_for_keyword(field.strip()) is None:
        where = f"a column of {display_path(data)} nor " if columns else ""
        raise PneumoniaCNNError(f"--by {field}: not {where}a DICOM attribute keyword (e.g. PatientSex, ViewPosition, "
                                f"Manufacturer, InstitutionName) nor AgeBand")
    return [value or MISSING for value in dicom_values(paths, field.strip())]


def subgroup_metrics(field: str, labels, probabilities, threshold: float, values, patients=None,
                     resamples: int = 1000, seed: int = 0, predicted=None) -> dict:
    """Every metric with its interval per group of ``values``, and the largest gap between groups
    (``predicted``: the decisions as made, when given)."""
    labels, probabilities, values = np.asarray(labels).astype(int), np.asarray(probabilities, float), np.asarray(values)
    predicted = None if predicted is None else np.asarray(predicted)
    groups = []
    bands = [name for _, name in AGE_BANDS]  # by age, not as text (1-5y, 18-39y, 6-17y)
    for value in sorted(set(values.tolist()), key=lambda v: (v == MISSING, bands.index(v) if v in bands else -1, v)):
        chosen = np.where(values == value)[0]
        units = None if patients is None else np.asarray(patients)[chosen]
        groups.append({"value": value, "n_images": len(chosen), "n_positive": int(labels[chosen].sum()),
                       "n_negative": int((labels[chosen] == 0).sum()),
                       "metrics": bootstrap_metrics(labels[chosen], probabilities[chosen], threshold, groups=units,
                                                    resamples=resamples, seed=seed,
                                                    predicted=None if predicted is None else predicted[chosen])})
    small = few_per_class_groups(groups, labels, values, patients)
    return {"field": field, "groups": groups, "largest_gap": largest_gaps(groups), "few_per_class": list(small),
            "notes": few_per_class_notes(small, patients)}


def few_per_class_groups(groups: list[dict], labels, values, patients) -> dict[str, str]:
    """The groups whose intervals rest on fewer than FEW_PER_CLASS units (images, or patients) of a class they hold,
    each with its counts in words: their bootstrap barely varies, so the intervals are too narrow."""
    unit = "image" if patients is None else "patient"
    small = {}
    for group in groups:
        chosen = np.where(values == group["value"])[0]
        units = units_per_class(labels[chosen], None if patients is None else np.asarray(patients)[chosen])
        held = [u for u, n in zip(units, (group["n_negative"], group["n_positive"])) if n]
        if held and min(held) < FEW_PER_CLASS:
            small[group["value"]] = f"{group['value']} ({units[1]}+/{units[0]}- {unit}s)"
    return small


def few_per_class_notes(small: dict[str, str], patients) -> list[str]:
    """As ``evaluate`` notes it of the whole split."""
    unit = "image" if patients is None else "patient"
    if not small:
        return []
    return [f"intervals unreliable in {', '.join(small.values())}: fewer than {FEW_PER_CLASS} {unit}s of a class; a "
            f"bootstrap of so few barely varies, so those intervals are too narrow or undefined, and gaps to those "
            f"groups are uncertain"]


# the classes a group must hold for a metric to measure anything there: without them it is undefined (NaN) or
# fixed by construction (no NORMAL image: PPV 1 and NPV 0 whatever the model does; no PNEUMONIA: PPV and F1 0,
# NPV 1), and a gap to that value says nothing of the model
NEEDS = {"sensitivity": ("n_positive",), "specificity": ("n_negative",), "f1": ("n_positive",),
         **{name: ("n_positive", "n_negative") for name in ("balanced_accuracy", "ppv", "npv", "roc_auc", "pr_auc")}}


def measured(group: dict, metric: str) -> bool:
    """Whether ``metric`` measures the model in ``group``: a value, of a group holding the classes it needs."""
    return np.isfinite(group["metrics"][metric]["value"]) and all(group[n] for n in NEEDS.get(metric, ()))


def largest_gaps(groups: list[dict]) -> dict:
    """Per metric: the best and worst group (left out: (missing), and groups where it is undefined or fixed by a
    missing class, ``measured``)."""
    gaps = {}
    for metric in METRICS:
        scored = [(g["metrics"][metric]["value"], g["value"]) for g in groups
                  if g["value"] != MISSING and measured(g, metric)]
        if len(scored) < 2:
            continue
        (low, low_group), (high, high_group) = min(scored), max(scored)
        best, worst = ((low_group, high_group) if metric in LOWER_IS_BETTER else (high_group, low_group))
        gaps[metric] = {"gap": float(high - low), "best": best, "worst": worst}
    return gaps


def subgroup_results(fields, report: dict, cached, data) -> list[dict]:
    """``evaluate --by``: the subgroup tables for the images of an evaluation report."""
    probabilities = [p["probability"] for p in report["predictions"]]
    predicted = decided_positive(report)
    patients = cached.patients if has_patient_ids(cached.paths) else None
    return [subgroup_metrics(field, cached.labels, probabilities, report["threshold"],
                             field_values(cached.paths, field, data), patients, report["bootstrap"]["resamples"],
                             report["bootstrap"]["seed"], predicted) for field in fields]


def undefined_reason(metric: str, confusion: dict, class_names=("NORMAL", "PNEUMONIA")) -> str:
    """Why ``metric`` has no value, in a few words from the confusion matrix ("nan [nan, nan]" said nothing)."""
    tn, fp, fn, tp = (confusion[k] for k in ("tn", "fp", "fn", "tp"))
    negative, positive = class_names[0], class_names[1]
    reasons = {"sensitivity": (tp + fn == 0, f"no {positive} image"),
               "specificity": (tn + fp == 0, f"no {negative} image"),
               "ppv": (tp + fp == 0, f"no image called {positive}"),
               "npv": (tn + fn == 0, f"no image called {negative}"),
               "f1": (tp + fp + fn == 0, f"no {positive} image, none called so")}
    if metric in reasons and reasons[metric][0]:
        return reasons[metric][1]
    return "needs both classes" if min(tp + fn, tn + fp) == 0 else "no value"


def metric_line(name: str, entry: dict, confusion: dict, class_names) -> str:
    """``evaluate``'s table row: the value and its 95% interval, or "undefined" and why."""
    if math.isnan(entry["value"]):
        return f"{name:<20}{'undefined':>9}   ({undefined_reason(name, confusion, class_names)})"
    return f"{name:<20}{entry['value']:>9.4f}   [{entry['ci95'][0]:.4f}, {entry['ci95'][1]:.4f}]"


def _cell(entry: dict, fixed: bool = False) -> str:
    value, (low, high) = entry["value"], entry["ci95"]
    if math.isnan(value):
        return "-"
    if fixed:  # set by the class the group lacks, not by the model: left out of the gaps
        return f"{value:.3f} (fixed)"
    return f"{value:.3f} (no CI)" if math.isnan(low) else f"{value:.3f} [{low:.3f}, {high:.3f}]"  # as the value


def format_subgroups(result: dict) -> str:
    """A text table: one row per metric, one column per group, then the largest gap."""
    groups = result["groups"]
    titles = [f"{g['value']} (n={g['n_images']}: {g['n_positive']}+/{g['n_negative']}-)" for g in groups]
    width = max([22] + [len(t) for t in titles])
    lines = [f"by {result['field']}:", f"{'metric':<18}" + "".join(f"{t:>{width + 2}}" for t in titles)
             + "  largest gap"]
    for metric in METRICS:
        gap = result["largest_gap"].get(metric)
        lines.append(f"{metric:<18}" + "".join(f"{_cell(g['metrics'][metric], not measured(g, metric)):>{width + 2}}"
                                               for g in groups)
                     + (f"  {gap['gap']:.3f} ({gap['best']} vs {gap['worst']}){_few_mark(result, gap)}" if gap
                        else "  -"))
    if any(not measured(g, metric) for g in groups for metric in METRICS):
        lines.append("note: - is a metric undefined in a group (no image of the class it needs, or none called "
                     "positive for PPV, negative for NPV), (fixed) one set by the class a group lacks; both are left "
                     "out of the largest gap")
    if any(_few_mark(result, gap) for gap in result["largest_gap"].values()):
        lines.append(f"note: * a gap to a group of fewer than {FEW_PER_CLASS} of a class: its size alone can make it "
                     f"best or worst (a group of 4 images had been best in every metric)")
    lines += [f"note: {note}" for note in result.get("notes", [])]
    return "\n".join(lines)


def _few_mark(result: dict, gap: dict) -> str:
    small = result.get("few_per_class") or []
    return " *" if gap["best"] in small or gap["worst"] in small else ""
