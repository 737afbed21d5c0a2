"""``compare``: several runs on the same images, side by side, with DeLong tests of the AUC differences and a
paired bootstrap of each difference by patient (DeLong takes a patient's images as independent)."""
from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from pathlib import Path

from ..data.dataset import evaluated_name
from ..errors import PneumoniaCNNError
from .evaluate import evaluate
from .metrics import delong_test, paired_auc_bootstrap, resample_notes

WITH_INTERVALS = ("sensitivity", "specificity", "roc_auc")
ROWS = ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "roc_auc", "pr_auc",
        "brier", "ece")


def compare_runs(runs, data, split="test", device="auto", cache_dir=None, bootstrap=1000) -> dict:
    refuse_copies(runs)
    with each_warning_once():
        reports = [evaluate(run, data, split, device=device, cache_dir=cache_dir, bootstrap=bootstrap, figures=False)
                   for run in runs]
    names = run_names(runs)
    reference_paths = [p["path"] for p in reports[0]["predictions"]]
    for report, name in zip(reports[1:], names[1:]):
        if [p["path"] for p in report["predictions"]] != reference_paths:
            raise PneumoniaCNNError(f"{name} was evaluated on other images (different preprocessing skipped different "
                                    "files)")
    labels = [p["label"] for p in reports[0]["predictions"]]
    if len(set(labels)) < 2:  # DeLong's test and the AUC need both classes (it printed "p = nan (not significant)")
        raise PneumoniaCNNError(f"{evaluated_name(data, split)} holds one class only: ROC AUC and DeLong's test "
                                f"need both")
    groups = [p["patient"] for p in reports[0]["predictions"]] if "patient" in reports[0]["predictions"][0] else None
    tests = []
    for index in range(1, len(reports)):
        scores_a = [p["probability"] for p in reports[0]["predictions"]]
        scores_b = [p["probability"] for p in reports[index]["predictions"]]
        tests.append({"a": names[0], "b": names[index], **delong_test(labels, scores_a, scores_b),
                      "bootstrap": paired_auc_bootstrap(labels, scores_a, scores_b, groups, resamples=bootstrap)})
    return {"runs": names, "data": str(data), "split": split, "n_images": reports[0]["n_images"],
            "metrics": {name: {k: report["metrics"][k] for k in ROWS} for name, report in zip(names, reports)},
            "thresholds": {name: report["threshold"] for name, report in zip(names, reports)},
            "delong": tests, "notes": resample_notes(bootstrap)}


@contextmanager
def each_warning_once():
    """Each run scans the same images, so a note on them ("class folder missing") was printed once per run."""
    # a filter of its own for each handler: a record goes through every handler, and must pass each once
    filters = [(handler, FirstTimeOnly()) for handler in logging.getLogger().handlers]
    for handler, only in filters:
        handler.addFilter(only)
    try:
        yield
    finally:
        for handler, only in filters:
            handler.removeFilter(only)


class FirstTimeOnly(logging.Filter):
    def __init__(self):
        super().__init__()
        self.seen = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, record.getMessage())
        if record.levelno >= logging.WARNING and key in self.seen:
            return False
        self.seen.add(key)
        return True


def refuse_copies(runs) -> None:
    """Before any scoring: a copy of one model under another name, with the same decision, gave every metric twice
    ("difference +0.0000, p = 1"). The same weights with another decision (``evaluate --save-as`` of a refitted
    threshold) are compared: their sensitivity, specificity and calibration differ."""
    from ..inference.bundle import load_bundle, refuse_repeated_weights
    by_decision = {}
    for bundle in (load_bundle(run) for run in runs):
        by_decision.setdefault(deciding(bundle.decision), []).append(bundle)
    for bundles in by_decision.values():
        refuse_repeated_weights([b.checkpoints[0] for b in bundles], [b.models[0] for b in bundles],
                                "compare needs different models or decisions (these give every metric alike)")


def deciding(decision) -> tuple:
    """What turns a model's scores into compare's figures: the calibration's method, scale and bias, the threshold
    and a shift to another pneumonia rate. Not the rate the calibration images had, nor the policy's name, which
    move nothing here: a run's last.pt holding best.pt's weights differed from it in that rate alone, and was
    compared with itself ("difference +0.0000, p = 1")."""
    calibration = decision.calibration
    return calibration.method, calibration.scale, calibration.bias, float(decision.threshold), decision.prior_shift


def run_names(runs) -> list[str]:
    """A distinct label per run: its folder's (or file's parent's) name, widened to more of its path where two
    would read alike (two runs named "best" showed one model's metrics under both names)."""
    def label(run, depth: int) -> str:
        if str(run) == "builtin":
            return str(run)
        parts = Path(run).resolve().parts  # "a/run", "a/run/" and "/x/a/run" are one run; "." has a name
        return "/".join(parts[-depth:]) if depth < len(parts) else "/".join(parts)
    for depth in range(1, 64):
        names = [label(run, depth if Path(run).is_dir() else depth + 1) for run in runs]
        if len(set(names)) == len(names):
            return names
    return [f"{index}:{run}" for index, run in enumerate(runs, start=1)]  # the same run given twice


def _shown(value, spec: str) -> str:
    """A figure, or "undefined" where the split cannot give one (NPV with no negative call): it printed nan, where
    the JSON has null and evaluate says "undefined"."""
    return "undefined" if value is None or not math.isfinite(value) else format(value, spec)


def format_comparison(result: dict) -> str:
    width = max(16, *(len(n) + 2 for n in result["runs"]))
    lines = [f"{evaluated_name(result.get('data', ''), result['split'])}: {result['n_images']} images",
             f"{'metric':<20}" + "".join(f"{n:>{width}}" for n in result["runs"])]
    for metric in ROWS:
        values = "".join(f"{_shown(result['metrics'][n][metric]['value'], '.4f'):>{width}}" for n in result["runs"])
        lines.append(f"{metric:<20}{values}")
        if metric in WITH_INTERVALS:  # the JSON has every interval; these three are the ones compared most
            shown = (f"[{_shown(low, '.3f')}, {_shown(high, '.3f')}]" for low, high in
                     (result["metrics"][n][metric]["ci95"] for n in result["runs"]))
            lines.append(f"{'  95% CI':<20}" + "".join(f"{text:>{width}}" for text in shown))
    lines.append(f"{'threshold':<20}" + "".join(f"{result['thresholds'][n]:>{width}.3f}" for n in result["runs"]))
    for test in result["delong"]:
        verdict = "significant" if test["p_value"] < 0.05 else "not significant"
        lines.append(f"DeLong {test['a']} vs {test['b']}: AUC {test['auc_a']:.4f} vs {test['auc_b']:.4f}, difference "
                     f"{test['difference']:+.4f} [{test['ci95'][0]:+.4f}, {test['ci95'][1]:+.4f}], "
                     f"p = {test['p_value']:.4g} ({verdict} at 0.05)")
        paired = test["bootstrap"]
        lines.append(f"  {paired['unit']} bootstrap ({paired['resamples']} resamples): difference "
                     f"[{paired['ci95'][0]:+.4f}, {paired['ci95'][1]:+.4f}], p = {paired['p_value']:.4g}")
    lines += [f"note: {note}" for note in result.get("notes", [])]
    return "\n".join(lines)
