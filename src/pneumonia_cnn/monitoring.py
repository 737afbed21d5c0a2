"""Drift: are the images a site sends still like the ones the model was validated on?

The checkpoint keeps its validation images' raw scores (logits before calibration) and out-of-distribution
scores (``checkpoint["reference"]["val"]``). A batch of new images, or the server's rolling window of recent
ones, is compared with that reference on both scores by the population stability index (PSI, over the
reference's quantile bins) and the two-sample Kolmogorov-Smirnov test. Neither needs labels.

Levels (docs/hospital.md, "Deploying in a hospital"): the usual reading of the index, PSI below 0.1 stable, 0.1 to
0.25 a shift worth watching ("warning"), above 0.25 a major shift ("drift"), assumes large samples. A sample of a
few dozen images from the reference's own distribution exceeds those by chance alone (30 of the model's own
validation images read "drift" 5 times in 6: with ten bins of about three images each, an empty bin adds ~0.69
through the 1e-4 floor). So each PSI is judged against its own chance distribution at this sample size
(``psi_levels``): "warning" above what chance gives 1 time in 100, "drift" above 1 time in 1,000 (as the KS test's
p < 0.001), never below 0.1 and 0.25. A KS p-value below 0.001 also counts as drift.
"""
from __future__ import annotations

import hashlib
import math
import threading
from collections import Counter, deque
from functools import lru_cache

import numpy as np

from .errors import PneumoniaCNNError

PSI_WARNING = 0.10
PSI_DRIFT = 0.25
KS_P_DRIFT = 0.001
SCORES = ("raw_scores", "ood_scores")
SMALL_REFERENCE = 100
OFFLINE_MINIMUM = 30  # new images before an offline check judges: the PSI of a handful is noise (one image: 8)
EPSILON = 1e-4  # an empty bin counts as this share, so the index stays finite
# the PSI's chance distribution at a sample size: this many draws, from a fixed seed (the levels are deterministic)
NULL_DRAWS = 4000
NULL_SEED = 20240611
CHANCE_WARNING = 0.01  # share of same-distribution samples whose PSI exceeds the warning level
CHANCE_DRIFT = 0.001  # ... and the drift level: as rare as KS p < 0.001
# more new images only lower the PSI chance gives: beyond this many, the levels of this many (already the floors,
# 0.1 and 0.25, for a reference of a few hundred images) keep the check fast
NULL_MAX_COUNT = 2000


def reference_of(checkpoint: dict) -> dict | None:
    """The validation scores a checkpoint keeps, or None for checkpoints of earlier versions."""
    val = (checkpoint.get("reference") or {}).get("val") or {}
    if not val.get("raw_scores"):
        return None
    out = {"raw_scores": np.asarray(val["raw_scores"], dtype=np.float64)}
    ood = val.get("ood_scores")
    if ood is not None and len(ood) == len(out["raw_scores"]) and all(v is not None for v in ood):
        out["ood_scores"] = np.asarray(ood, dtype=np.float64)
    return out


def same_reference(first: dict | None, second: dict | None) -> bool:
    """Whether two references (``reference_of``) hold the same validation scores."""
    if first is None or second is None:
        return first is second
    return first.keys() == second.keys() and all(np.array_equal(first[name], second[name]) for name in first)


NO_REFERENCE = ("no validation scores in this checkpoint (one of an earlier version, or adapted to a site: its "
                "model is not the one the scores came from)")


FAILING = {"warning": ("warning", "drift", "unavailable"), "drift": ("drift", "unavailable")}


def drift_exit_status(report: dict, fail_on: str | None) -> int:
    """``drift --fail-on``: 3 when the status reaches ``fail_on``, or nothing could be compared ("unavailable": a
    check that cannot see must not pass as "ok"); else 0, "collecting" included (it exited 0 whatever the status,
    so a scheduled job could not tell a drift from "ok")."""
    return 3 if fail_on and report["status"] in FAILING[fail_on] else 0


def no_reference_reason(checkpoint: dict) -> str:
    """Why a checkpoint keeps no validation scores, from what it is: a run's last.pt (its training state, written
    each epoch to resume training: the end-of-run steps store the scores in best.pt), an adapted model, or one
    of an earlier version."""
    if checkpoint.get("training_state") is not None:
        return ("no validation scores in this checkpoint: it is a training-state file, a run's last.pt kept to "
                "resume training; the run's best.pt holds them once the run has finished: give that")
    if checkpoint.get("adaptation"):
        return ("no validation scores in this checkpoint: it was adapted to a site, and its model is not the one "
                "the scores came from")
    if isinstance(checkpoint.get("imported"), dict):  # it said "one of an earlier version, or adapted to a site"
        return ("no validation scores in this checkpoint: it was imported from Keras, trained elsewhere; pneumonia-cnn "
                "evaluate --threshold POLICY --calibration platt --save-as fits a decision on validation images and "
                "keeps their scores")
    return NO_REFERENCE


def quantile_edges(reference: np.ndarray, bins: int) -> np.ndarray:
    """Inner bin edges at the reference's quantiles (ties merged), so each bin holds about 1/bins of it."""
    edges = np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1])
    return np.unique(edges)


def bin_count(reference_size: int) -> int:
    """Ten bins, fewer for a small reference: at least five reference images per bin."""
    return int(min(10, max(2, reference_size // 5)))


def population_stability_index(reference, current, bins: int | None = None) -> float:
    """PSI = sum over bins of (current share - reference share) * ln(current share / reference share)."""
    reference, current = np.asarray(reference, dtype=np.float64), np.asarray(current, dtype=np.float64)
    edges = quantile_edges(reference, bins or bin_count(len(reference)))
    expected = np.bincount(np.searchsorted(edges, reference, side="right"), minlength=len(edges) + 1)
    actual = np.bincount(np.searchsorted(edges, current, side="right"), minlength=len(edges) + 1)
    expected = np.maximum(expected / len(reference), EPSILON)
    actual = np.maximum(actual / len(current), EPSILON)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def _bin_shares(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Row-wise ``population_stability_index`` binning: (draws, size) values and (draws, bins - 1) inner edges ->
    (draws, bins) shares, floored at EPSILON. A repeated edge leaves an empty bin on both sides, worth 0."""
    at_or_above = (values[:, :, None] >= edges[:, None, :]).sum(axis=1)  # searchsorted(side="right") per row
    size = values.shape[1]
    cumulative = np.concatenate([np.full((len(values), 1), size), at_or_above, np.zeros((len(values), 1), int)], 1)
    return np.maximum((cumulative[:, :-1] - cumulative[:, 1:]) / size, EPSILON)


def null_psi(reference, count: int, draws: int = NULL_DRAWS, seed: int = NULL_SEED) -> np.ndarray:
    """The PSI of ``count`` new scores when nothing has drifted: both a reference of the reference's size and the
    new scores drawn (with replacement) from the reference, the bins cut at the drawn reference's quantiles, as
    ``population_stability_index`` does; ``draws`` of them, deterministic for a given reference and count."""
    reference = np.asarray(reference, dtype=np.float64)
    size, rng = len(reference), np.random.default_rng([seed, len(reference), int(count)])
    probabilities = np.linspace(0, 1, bin_count(size) + 1)[1:-1]
    chunk = max(1, min(500, 4_000_000 // ((size + int(count)) * max(1, len(probabilities)))))  # a few MB at a time
    out = []
    for start in range(0, draws, chunk):
        rows = min(chunk, draws - start)
        drawn = np.sort(reference[rng.integers(0, size, (rows, size))], axis=1)
        current = reference[rng.integers(0, size, (rows, int(count)))]
        edges = np.quantile(drawn, probabilities, axis=1).T.reshape(rows, -1)
        expected, actual = _bin_shares(drawn, edges), _bin_shares(current, edges)
        out.append(np.sum((actual - expected) * np.log(actual / expected), axis=1))
    return np.concatenate(out)


@lru_cache(maxsize=256)
def _levels(reference_bytes: bytes, count: int) -> tuple[float, float]:
    count = min(count, NULL_MAX_COUNT)
    chance = null_psi(np.frombuffer(reference_bytes, dtype=np.float64), count)
    warning, drift = np.quantile(chance, [1 - CHANCE_WARNING, 1 - CHANCE_DRIFT])
    return max(PSI_WARNING, float(warning)), max(PSI_DRIFT, float(drift))


def psi_levels(reference, count: int) -> tuple[float, float]:
    """(warning, drift) PSI levels for ``count`` new scores against ``reference``: the PSIs that samples of that
    size from the reference's own distribution exceed 1 time in 100 and 1 time in 1,000, never below 0.1 and
    0.25. For the builtin model's 559 validation scores: about (1.8, 2.3-2.4) at 30 images, (1.0, 1.2-1.5) at 50,
    (0.29, 0.39) at 100, (0.17, 0.25) at 178 and (0.1, 0.25) at 500. Cached: about 0.3 s for a new count."""
    return _levels(np.ascontiguousarray(reference, dtype=np.float64).tobytes(), int(count))


def ks_test(reference, current) -> tuple[float, float]:
    from scipy.stats import ks_2samp
    result = ks_2samp(np.asarray(reference, dtype=np.float64), np.asarray(current, dtype=np.float64))
    return float(result.statistic), float(result.pvalue)


def level_of(psi: float, ks_pvalue: float, warning: float = PSI_WARNING, drift: float = PSI_DRIFT) -> str:
    """``warning`` and ``drift``: the PSI levels at this sample size (``psi_levels``); the fixed ones by default."""
    if psi > drift or ks_pvalue < KS_P_DRIFT:
        return "drift"
    return "warning" if psi > warning else "ok"


LEVELS = {"psi": f"above what samples of the same size from the reference give by chance {CHANCE_WARNING:g} "
                 f"(warning) or {CHANCE_DRIFT:g} (drift) of the time, never below {PSI_WARNING} and {PSI_DRIFT}",
          "psi_warning_at_least": PSI_WARNING, "psi_drift_at_least": PSI_DRIFT, "psi_chance_warning": CHANCE_WARNING,
          "psi_chance_drift": CHANCE_DRIFT, "ks_pvalue_drift": KS_P_DRIFT}


def judge(reference, values) -> dict:
    """One score's PSI and KS test against the reference, and its level at this many values."""
    psi = population_stability_index(reference, values)
    statistic, pvalue = ks_test(reference, values)
    warning, drift = psi_levels(reference, len(values))
    return {"psi": psi, "ks_statistic": statistic, "ks_pvalue": pvalue, "psi_warning": warning, "psi_drift": drift,
            "status": level_of(psi, pvalue, warning, drift), "mean": float(np.mean(values)),
            "reference_mean": float(np.mean(reference))}


def compare(reference: dict | None, current: dict, minimum: int = 1, no_reference: str = NO_REFERENCE) -> dict:
    """``current``: {"raw_scores": [...], "ood_scores": [...]} of new images -> a report per score and overall;
    ``no_reference``: the reason given when ``reference`` is None (``no_reference_reason``)."""
    count = len(current.get("raw_scores", []))
    report = {"images": count, "levels": dict(LEVELS)}
    if reference is None:
        return {**report, "status": "unavailable", "reason": no_reference}
    report["reference_images"] = len(reference["raw_scores"])
    if len(reference["raw_scores"]) < SMALL_REFERENCE:
        report["note"] = (f"the reference holds only {len(reference['raw_scores'])} validation images: the PSI "
                          f"is noisy (bins of a few images), its levels high; trust the KS p-value more")
    if count < minimum:
        return {**report, "status": "collecting", "reason": f"{count} of {minimum} images needed"}
    worst = "ok"
    for name in SCORES:
        values = [v for v in current.get(name, []) if v is not None and math.isfinite(v)]
        if name not in reference or not values:
            continue
        report[name] = judge(reference[name], values)
        worst = max(worst, report[name]["status"], key=("ok", "warning", "drift").index)
    return {**report, "status": worst}


class DriftMonitor:
    """The server's rolling window of recent scores, compared with the reference on demand. An image whose ``key``
    (its content's hash) is already in the window is a copy: counted once, and in ``copies_counted_once``."""

    def __init__(self, reference: dict | None, window: int = 500, minimum: int | None = None,
                 no_reference: str = NO_REFERENCE):
        self.reference, self.window, self.no_reference = reference, int(window), no_reference
        self.minimum = int(minimum if minimum is not None else min(100, self.window))
        self.raw, self.ood = deque(maxlen=self.window), deque(maxlen=self.window)
        self.keys: deque = deque(maxlen=self.window)
        self.in_window: Counter = Counter()
        self.lock = threading.Lock()
        self.seen = self.copies = 0
        self._cached: tuple[int, dict] | None = None

    def add(self, raw_score: float, ood_score: float | None, key: str | bytes | None = None) -> None:
        with self.lock:
            self.seen += 1
            if key is not None and self.in_window[key]:
                self.copies += 1
                return
            if len(self.keys) == self.window and self.keys[0] is not None:  # about to slide out of the window
                self.in_window[self.keys[0]] -= 1
                if not self.in_window[self.keys[0]]:
                    del self.in_window[self.keys[0]]
            self.keys.append(key)
            if key is not None:
                self.in_window[key] += 1
            self.raw.append(float(raw_score))
            self.ood.append(None if ood_score is None else float(ood_score))

    def report(self) -> dict:
        with self.lock:
            seen, copies = self.seen, self.copies
            current = {"raw_scores": list(self.raw), "ood_scores": list(self.ood)}
        if self._cached is not None and self._cached[0] == seen:
            return self._cached[1]
        report = {**compare(self.reference, current, self.minimum, self.no_reference), "window": self.window,
                  "copies_counted_once": copies}
        self._cached = (seen, report)
        return report


def score_distinct(predictor, paths, batch_size: int = 32) -> tuple[list[dict], list[dict], list[dict]]:
    """(scored entries of the distinct readable images, {"path", "error"} of the unreadable ones, {"path",
    "copy_of"} of the copies set aside): the same pixels under another name count once, as in adapt,
    --adapt-batch and --prevalence estimate (30 copies of one X-ray had been judged as 30 new images)."""
    from .inference.files import decode_files
    from .inference.predictor import STREAM_CHUNK
    first: dict[bytes, str] = {}
    entries, skipped, copies = [], [], []
    for chunk in decode_files(paths, predictor.bundle.preprocessing, max(batch_size, STREAM_CHUNK)):
        kept = []
        for item in chunk:
            if item.pixels is None:
                skipped.append({"path": item.path, "error": item.error})
                continue
            key = hashlib.sha256(np.ascontiguousarray(item.pixels).tobytes()).digest()
            if key in first:
                copies.append({"path": item.path, "copy_of": first[key]})
            else:
                first[key] = item.path
                kept.append(item)
        if kept:
            entries += predictor.assess(np.stack([item.pixels for item in kept]), [item.meta for item in kept],
                                        batch_size)[0]
    return entries, skipped, copies


def drift_of_files(checkpoint, paths, device: str = "cpu", batch_size: int = 32,
                   minimum: int = OFFLINE_MINIMUM) -> dict:
    """``pneumonia-cnn drift``: the same comparison for a folder of new images, offline, each distinct image once
    (judged from ``minimum`` distinct readable images on; a PneumoniaCNNError when none is readable)."""
    from .inference import Predictor
    from .inference.bundle import load_bundle
    bundle = load_bundle(checkpoint)
    paths = [str(path) for path in paths]
    entries, skipped, copies = score_distinct(Predictor(bundle, device), paths, batch_size)
    if not entries:
        raise PneumoniaCNNError(f"none of the {len(paths)} image(s) could be read (first: "
                                f"{skipped[0]['path']}: {skipped[0]['error']})")
    current = {"raw_scores": [e["raw_score"] for e in entries], "ood_scores": [e.get("ood_score") for e in entries]}
    report = compare(reference_of(bundle.checkpoints[0]), current, minimum, no_reference_reason(bundle.checkpoints[0]))
    report["copies_counted_once"], report["copies"] = len(copies), copies
    if copies and report["status"] == "collecting":
        report["reason"] += f"; {len(copies)} copies of others counted once"
    report["skipped"] = skipped
    report["model"] = bundle.model_id
    return report


def format_drift(report: dict) -> str:
    copies = report.get("copies_counted_once", 0)
    lines = [f"drift: {report['status']}" + (f" ({report['reason']})" if report.get("reason") else ""),
             f"images: {report['images']} new" + (f" ({copies} copies of others counted once)" if copies else "")
             + f", {report.get('reference_images', 0)} in the reference (validation)"]
    for name, title in (("raw_scores", "scores"), ("ood_scores", "OOD scores")):
        if name in report:
            part = report[name]
            lines.append(f"{title:>10}: PSI {part['psi']:.3f} (warning > {part['psi_warning']:.3g}, drift > "
                         f"{part['psi_drift']:.3g})  KS {part['ks_statistic']:.3f} (p={part['ks_pvalue']:.2g})  "
                         f"mean {part['mean']:.3f} vs {part['reference_mean']:.3f}  -> {part['status']}")
    levels = report["levels"]
    lines.append(f"levels: PSI above what as many images from the reference's distribution give by chance "
                 f"{levels['psi_chance_warning']:.0%} of the time warning, {levels['psi_chance_drift']:.1%} drift "
                 f"(never below {levels['psi_warning_at_least']} and {levels['psi_drift_at_least']}); "
                 f"KS p < {levels['ks_pvalue_drift']} drift")
    if report.get("note"):
        lines.append(f"note: {report['note']}")
    for item in report.get("copies", [])[:3]:
        lines.append(f"copy {item['path']}: the same image as {item['copy_of']}, counted once")
    if copies > 3:
        lines.append(f"... and {copies - 3} more copies (all in the JSON's copies)")
    for item in report.get("skipped", []):
        lines.append(f"skipped {item['path']}: {item['error']}")
    return "\n".join(lines)
