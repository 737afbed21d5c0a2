"""End of a run, on best.pt's weights and the scorer's own outputs (fit on what is served): calibration and
threshold on validation, the out-of-distribution detector, and the reference that ensembles, ``evaluate``'s
overlap check and drift monitoring read."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..calibration import (
    Calibration,
    Decision,
    compare_calibrations,
    fit_calibration,
    fit_decision,
    parse_threshold_policy,
    reliability_bins,
)
from ..checkpoint import load_checkpoint, save_checkpoint
from ..data.fingerprint import file_fingerprints
from ..inference import Scorer, load_bundle
from ..inference.adabn import adapt_batch_norm, fit_class_mix, has_batch_norm
from ..inference.predictor import in_distribution
from .config import TrainConfig

log = logging.getLogger(__name__)
MAX_OOD_FIT_IMAGES = 1000  # the k-NN reference set: checkpoint size (built-in model under 5 MB), cost per image


def finish_run(out: Path, config: TrainConfig, train_set, val_set, device) -> dict:
    best = load_checkpoint(out / "best.pt")
    best.pop("ood", None)
    bundle = load_bundle(best)
    from ..ood import default_taps
    scorer = Scorer(bundle, device, engine="auto", amp="off", taps=default_taps(bundle.models[0]) if config.ood else [])
    usable_val = val_set is not None and len(val_set) and len(set(val_set.labels.tolist())) == 2
    adapted_raw = None
    val_scores = scorer.score(val_set.images) if usable_val else None
    decision = _fit_decision(config, val_set.labels if usable_val else None, val_scores)
    best.update(calibration=decision.calibration.to_dict(), threshold=decision.threshold,
                threshold_policy=decision.policy, decision_fit=dict(scorer.description, split="val",
                                                                    images=len(val_set) if usable_val else 0))
    best.pop("temperature", None)
    if decision.calibration.note:  # asked for one, got none: said once, and kept beside the record of the fit
        log.warning("best.pt: on the validation images, %s", decision.calibration.note)
        best["decision_fit"].update(calibration_requested=config.calibration,
                                    calibration_note=decision.calibration.note)
    if usable_val:
        best["decision_fit"]["calibration_comparison"] = compare_calibrations(val_set.labels, val_scores.raw,
                                                                              seed=config.seed)
        _reliability_figure(val_set.labels, val_scores.raw, out / "calibration.png")
    ood_scores = None
    if config.ood:
        detector, ood_scores = _fit_ood(scorer, train_set, val_set, val_scores, config)
        best["ood"] = detector.state()
    if usable_val and has_batch_norm(bundle.models[0]):  # after the detector: it adapts on what it does not flag
        adapted_raw = _fit_adapted_decision(best, decision, val_set, val_scores, device, config)
    if usable_val:
        best["reference"] = {"val": {"fingerprints": file_fingerprints(val_set.paths),
                                     "labels": [int(v) for v in val_set.labels],
                                     "raw_scores": [float(v) for v in val_scores.raw],
                                     "ood_scores": None if ood_scores is None else [float(v) for v in ood_scores],
                                     "adapted_raw_scores": [float(v) for v in adapted_raw] if adapted_raw is not None
                                     else None}}
    best.pop("path", None)
    save_checkpoint(best, out / "best.pt")
    method = decision.calibration.method
    log.info("best.pt: epoch %s, %s%s, threshold %.3f (%s)%s", best.get("epoch"),
             "no calibration" if method == "none" else f"{method} calibration",
             f" ({config.calibration} not applied)" if decision.calibration.note else "",
             decision.threshold, decision.policy,
             ", OOD detector fitted" if config.ood else "")
    return {"threshold": decision.threshold, "calibration": decision.calibration.to_dict()}


def _fit_adapted_decision(best: dict, decision: Decision, val_set, val_scores, device,
                          config: TrainConfig) -> np.ndarray:
    """The decision ``--adapt-batch`` uses, fitted as it is served: batch-norm statistics re-estimated on the
    validation images the detector does not flag, as one batch (at their class mix, by pseudo-labels), then
    calibration and threshold on every validation image's scores (it adapted on all of them; 20 of the built-in
    model's 559 are flagged)."""
    bundle = load_bundle(best)  # with the detector just fitted, as --adapt-batch will load it
    images = np.asarray(val_set.images)
    inside = in_distribution(bundle, images, val_scores, val_set.metas())
    inside = inside if inside.any() else np.ones_like(inside)  # a detector that flags all: adapt on them all
    drawn_by, why = fit_class_mix(images[inside], decision.positive(val_scores.raw)[inside],
                                  np.asarray(val_set.labels)[inside], bundle.class_names)
    if why:  # a detail of a decision used only when --adapt-batch is asked for: kept with the fit, said as info
        log.info("--adapt-batch's decision (used with --adapt-batch only): %s", why)
        best["decision_fit"]["adapted_class_mix"] = why
    prior = float(np.mean(val_set.labels))
    adapted = Scorer(adapt_batch_norm(bundle, images[inside], drawn_by, prior), device, engine="auto", amp="off")
    raw = adapted.score(val_set.images).raw
    decision = fit_decision(val_set.labels, raw, config.threshold, config.calibration)
    if decision.calibration.note:
        log.warning("--adapt-batch's decision: on the validation images, %s", decision.calibration.note)
        best["decision_fit"]["adapted_calibration_note"] = decision.calibration.note
    best["decision_adapted"] = {"calibration": decision.calibration.to_dict(), "threshold": decision.threshold,
                                "threshold_policy": decision.policy}
    return raw


def _fit_decision(config: TrainConfig, labels, val_scores) -> Decision:
    if val_scores is not None:
        return fit_decision(labels, val_scores.raw, config.threshold, config.calibration)
    kind, value = parse_threshold_policy(config.threshold)
    log.warning("no validation images with both classes: no calibration, threshold %s",
                value if kind == "fixed" else "0.5")
    return Decision(Calibration(), value if kind == "fixed" else 0.5, config.threshold if kind == "fixed" else "0.5")


def _fit_ood(scorer: Scorer, train_set, val_set, val_scores, config: TrainConfig):
    """The detector on (a sample of) the training images' tap features; its threshold on val's scores."""
    from ..ood import OODDetector
    rng = np.random.default_rng(config.seed)
    chosen = np.sort(rng.permutation(len(train_set))[:MAX_OOD_FIT_IMAGES])
    pixels = np.asarray(train_set.images[chosen])
    train_scores = scorer.score(pixels)
    fit = {"features": train_scores.features, "logits": train_scores.raw, "pixels": pixels,
           "labels": np.asarray(train_set.labels)[chosen]}
    held = None
    if val_scores is not None:
        held = {"features": val_scores.features, "logits": val_scores.raw, "pixels": np.asarray(val_set.images)}
    detector = OODDetector.fit(scorer.bundle.models[0], fit, held, quantile=config.ood_quantile, seed=config.seed)
    ood_scores = detector.score(held["features"], held["logits"], held["pixels"]) if held is not None else None
    return detector, ood_scores


def _reliability_figure(labels, raw_scores, path: Path):
    from ..plots import reliability_diagram
    curves = {method: reliability_bins(labels, fit_calibration(labels, raw_scores, method).probabilities(raw_scores))
              for method in ("none", "temperature", "platt")}
    reliability_diagram(curves, path, "Reliability on validation (fitted there)")
