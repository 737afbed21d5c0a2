"""``evaluate``: predictions on a labelled split (folder or CSV) -> metrics with intervals, JSON, pictures.

It never writes the checkpoint it reads: a threshold or calibration refitted on validation images is used for
this evaluation and written only to ``save_as``. It refuses to report on the images a decision was fitted on
(the checkpoint's own validation images, or those of a refit), compared by resolved path and file content,
whatever the split is called.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from ..calibration import CALIBRATION_METHODS, Decision, choose_threshold, fit_decision, parse_threshold_policy
from ..checkpoint import save_checkpoint
from ..data.cache import build_or_load
from ..data.dataset import evaluated_name, has_patient_ids, load_split
from ..data.fingerprint import file_fingerprints
from ..errors import DatasetError, PneumoniaCNNError
from ..fileio import OutputError, display_path, json_text
from ..inference import Predictor, Scorer, load_bundle
from .duplicates import duplicate_groups, duplicate_notes
from .metrics import bootstrap_metrics, interval_notes, per_patient, resample_notes
from .staging import FIGURE_NAMES, Staged, check_figures_folder, pictures_of
from .subgroups import metric_line

log = logging.getLogger(__name__)


def cached_split(bundle, data, split, cache_dir=None, progress=False):
    pre = bundle.preprocessing
    images = load_split(data, split, class_names=bundle.class_names)
    return build_or_load(images, pre.size, pre.interpolation, pre.intensity, cache_dir=cache_dir, progress=progress)


def refuse_overlap(evaluated, fitted_fingerprints, evaluated_fingerprints, fitted_paths=(), what: str = ""):
    """One-line error when any evaluated image is among the images a decision was fitted on."""
    resolved = {str(Path(p).resolve()) for p in fitted_paths}
    by_path = [p for p in evaluated.paths if str(Path(p).resolve()) in resolved]
    fitted = set(fitted_fingerprints)
    by_content = [p for p, f in zip(evaluated.paths, evaluated_fingerprints) if f in fitted]
    overlap = sorted(set(by_path) | set(by_content))
    if overlap:
        verb = "is" if len(overlap) == 1 else "are"
        raise PneumoniaCNNError(f"{display_path(overlap[0])}: {len(overlap)} of the {len(evaluated)} evaluated images "
                                f"{verb} among the images {what} was fitted on; metrics there would flatter the model "
                                f"(evaluate another split)")


def refuse_stored_overlap(bundle, evaluated, evaluated_fingerprints, calibration_only: bool = False):
    """The images each checkpoint's stored decision was fitted on: its calibration's (``reference.val``) and,
    unless only the calibration is kept, a threshold refitted later on other images (``reference.threshold_fit``)."""
    for member in bundle.checkpoints:
        reference = member.get("reference") or {}
        fingerprints = list((reference.get("val") or {}).get("fingerprints") or [])
        if not calibration_only:
            fingerprints += (reference.get("threshold_fit") or {}).get("fingerprints") or []
        what = "calibration" if calibration_only else "threshold and calibration"
        refuse_overlap(evaluated, fingerprints, evaluated_fingerprints,
                       what=f"{display_path(member.get('path', 'the checkpoint'))}'s {what}")


def refit_decision(bundle, data, val_split: str, policy: str | None, method: str | None, device="auto",
                   cache_dir=None, engine: str = "auto", adapted: bool = False):
    """Calibration and threshold fitted on ``val_split``'s served scores; returns (bundle, val cache, fit).
    ``adapted``: ``--adapt-batch``'s own decision is refitted the same way (when the checkpoint has one)."""
    try:
        val = cached_split(bundle, data, val_split, cache_dir)
    except DatasetError as error:
        raise PneumoniaCNNError(f"refitting the decision needs validation images: {error}") from None
    if len(set(val.labels.tolist())) < 2:
        raise PneumoniaCNNError(f"{display_path(data)}: split {val_split} needs both classes to fit a decision")
    scorer = Scorer(bundle, device, engine)
    scores = scorer.score(val.images)
    raw = scores.raw
    decision = _refitted(bundle.decision, val.labels, raw, policy, method)
    fit = dict(scorer.description, split=val_split, images=len(val), data=str(data),
               refitted=["threshold"] if method is None else ["threshold", "calibration"],
               fingerprints=file_fingerprints(val.paths), labels=[int(v) for v in val.labels],
               raw_scores=[float(v) for v in raw])
    adapted_decision = None
    if adapted and bundle.adapted_decision is not None:
        adapted_decision, adapted_raw, why = _refit_adapted(bundle, decision, val, scores, policy, method, device,
                                                            engine)
        fit.update(adapted_refitted=True, adapted_raw_scores=[float(v) for v in adapted_raw], adapted_class_mix=why)
    return bundle.with_decision(decision, adapted_decision), val, fit


def is_fixed_threshold(threshold, calibration) -> bool:
    """A probability given as the threshold, the calibration kept: set, not fitted on any images."""
    return calibration is None and threshold is not None and str(threshold) != "saved" \
        and parse_threshold_policy(threshold)[0] == "fixed"


def fixed_decision(bundle, threshold, adapted: bool = False):
    """The stored calibration(s) with the given probability as the threshold (with ``adapted``, that of
    ``--adapt-batch``'s own decision too); no images are read, so none are refused as fitted on.
    Returns (bundle, fit)."""
    value, policy = choose_threshold([], [], threshold), str(threshold)
    adapted = bundle.adapted_decision if adapted else None
    adapted = None if adapted is None else Decision(adapted.calibration, value, policy)
    fit = {"split": None, "images": 0, "refitted": ["threshold"], "fixed": value, "adapted_refitted": bool(adapted)}
    return bundle.with_decision(Decision(bundle.decision.calibration, value, policy), adapted), fit


def _refitted(stored: Decision, labels, raw, policy: str | None, method: str | None) -> Decision:
    if method is None:  # a threshold alone: the stored calibration stays, so a probability means what it meant
        calibration = stored.calibration
        return Decision(calibration, choose_threshold(labels, calibration.probabilities(raw), policy), str(policy))
    return fit_decision(labels, raw, policy or stored.policy, method)


def _refit_adapted(bundle, decision: Decision, val, scores, policy, method, device, engine):
    """As ``--adapt-batch`` will serve it: batch-norm statistics re-estimated on the split's images the detector
    does not flag, as one batch (by the refitted decision's pseudo-labels, at the class mix the adapted
    calibration states: the split's own when it is refitted, else the stored one's), then the same refit on every
    image's scores. Returns (decision, raw scores, why the labels drew the class mix or "")."""
    from ..inference.adabn import adapt_batch_norm, fit_class_mix
    from ..inference.predictor import in_distribution
    stored = bundle.adapted_decision
    rate = float(np.mean(val.labels)) if method is not None or stored.calibration.prior is None \
        else stored.calibration.prior
    images = np.asarray(val.images)
    inside = in_distribution(bundle, images, scores, val.metas())
    inside = inside if inside.any() else np.ones_like(inside)
    drawn_by, why = fit_class_mix(images[inside], decision.positive(scores.raw)[inside], val.labels[inside],
                                  bundle.class_names)
    adapted = Scorer(adapt_batch_norm(bundle, images[inside], drawn_by, rate), device, engine, cache=False)
    adapted_raw = adapted.score(images).raw
    return _refitted(stored, val.labels, adapted_raw, policy, method), adapted_raw, why


def check_save_as(bundle, save_as, sources):
    """Before any refit: --save-as writes one new checkpoint, never one of those read."""
    if len(bundle.checkpoints) > 1:
        raise PneumoniaCNNError("--save-as writes one checkpoint; an ensemble's decision is fitted on its members' "
                                "stored validation scores whenever it is loaded")
    target = Path(save_as).resolve()
    if any(target == Path(s).resolve() or (Path(s).is_dir() and target.parent == Path(s).resolve()
                                           and target.name in ("best.pt", "last.pt")) for s in sources):
        raise PneumoniaCNNError(f"{display_path(save_as)}: --save-as would overwrite the checkpoint it reads; "
                                f"choose a new path")


def save_refitted(bundle, fit: dict, save_as) -> Path:
    """The refitted checkpoint, as a new file (``check_save_as`` first)."""
    payload = {k: v for k, v in bundle.checkpoints[0].items() if k not in ("path", "training_state", "temperature")}
    decision = bundle.decision
    payload.update(calibration=decision.calibration.to_dict(), threshold=decision.threshold,
                   threshold_policy=decision.policy)
    reference = dict(payload.get("reference") or {})
    reference.pop("threshold_fit", None)
    if fit.get("fixed") is not None:  # set, not fitted: an earlier refit's images no longer stand behind it
        kept = {k: v for k, v in (payload.get("decision_fit") or {}).items() if k != "threshold_refit"}
        payload["decision_fit"] = dict(kept, threshold_fixed=fit["fixed"])
    elif "calibration" in fit["refitted"]:
        fitted_on = {k: fit[k] for k in ("engine", "precision", "tta", "device", "split", "images", "data")}
        payload["decision_fit"] = fitted_on
        reference["val"] = {"fingerprints": fit["fingerprints"], "labels": fit["labels"],
                            "raw_scores": fit["raw_scores"], "ood_scores": None,
                            "adapted_raw_scores": fit.get("adapted_raw_scores")}
    else:  # the calibration and its images (which drift and ensembles also read) stay; the threshold's are added
        fitted_on = {k: fit[k] for k in ("engine", "precision", "tta", "device", "split", "images", "data")}
        kept = {k: v for k, v in (payload.get("decision_fit") or {}).items() if k != "threshold_fixed"}
        payload["decision_fit"] = dict(kept, threshold_refit=fitted_on)
        reference["threshold_fit"] = {"split": fit["split"], "fingerprints": fit["fingerprints"]}
    payload["reference"] = reference
    if fit.get("adapted_refitted"):
        adapted = bundle.adapted_decision
        payload["decision_adapted"] = {"calibration": adapted.calibration.to_dict(), "threshold": adapted.threshold,
                                       "threshold_policy": adapted.policy}
    payload["refit_of"], payload["run_id"] = refit_id(bundle.checkpoints[0], payload)
    return save_checkpoint(payload, save_as)


def refit_id(source: dict, payload: dict) -> tuple[str, str]:
    """(the id of the model refitted, the refitted checkpoint's own id): that id, then a digest of the decision the
    refit holds. It kept the source's id, so predict's model column and the DICOM SR's Algorithm Version showed two
    different decisions as one model; the same refit of the same model gives the same id, and a refit of a refit
    names the model first refitted. The weights are unchanged, and so are the graph caches keyed by them."""
    refitted = source.get("refit_of") or source.get("run_id") or Path(source.get("path", "model")).stem
    decided = {key: payload.get(key) for key in ("calibration", "threshold", "threshold_policy", "decision_adapted")}
    digest = hashlib.sha256(json.dumps(decided, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return refitted, f"{refitted}-refit-{digest}"


def evaluate(checkpoint, data, split: str = "test", device: str = "auto", threshold: str | None = None,
             bootstrap: int = 1000, seed: int = 0, cache_dir=None, out=None, figures=True, batch_size: int = 64,
             progress: bool = False, calibration: str | None = None, save_as=None, val_split: str = "val",
             prevalence=None, adapt_batch: bool = False, engine: str = "auto", by=None, staged=None) -> dict:
    """Evaluate one checkpoint or an ensemble (a list) on ``data``/``split``; returns the report dict.

    ``threshold`` (a policy: ``youden``, ``sensitivity:0.95``, a number) or ``calibration`` refit the decision
    on ``val_split`` for this evaluation (written to ``save_as`` when given); None uses the saved decision.
    ``by`` (field names) adds the metrics per subgroup (``report["subgroups"]``, see ``subgroups.py``).
    ``out``: the JSON and its figures folder, replaced together at the end (``staging.py``), or, with ``staged``
    (a ``Staged``), left there for the caller to put in place with its own outputs.
    """
    sources = checkpoint if isinstance(checkpoint, (list, tuple)) else [checkpoint]
    refuse_refit_without_val(data, val_split, threshold, calibration)
    if out:
        check_figures_folder(figures_folder(Path(out)), figures)
    bundle = load_bundle(list(sources))
    cached = cached_split(bundle, data, split, cache_dir, progress)
    if len(cached) == 0:
        raise DatasetError(f"{display_path(data)}: no readable images in split {split}")
    evaluated_fingerprints = file_fingerprints(cached.paths)
    fit = None
    if (threshold is not None and str(threshold) != "saved") or calibration is not None:
        bundle, fit = _decision_for(bundle, sources, cached, evaluated_fingerprints, data, val_split, threshold,
                                    calibration, device, cache_dir, engine, adapt_batch, save_as)
    else:
        refuse_stored_overlap(bundle, cached, evaluated_fingerprints)
    predictor = Predictor(bundle, device, prevalence=prevalence, adapt_batch=adapt_batch, engine=engine)
    entries, notes = predictor.assess(cached.images, cached.metas(), batch_size=batch_size, progress=progress)
    report = build_report(predictor, cached, entries, notes, data, split, bootstrap, seed, evaluated_fingerprints)
    if by:
        from .subgroups import subgroup_results
        report["subgroups"] = subgroup_results(distinct_fields(by), report, cached, data)
    if fit is not None:
        report["decision_refit"] = {k: fit.get(k) for k in ("split", "images", "engine", "precision", "tta",
                                                            "refitted", "fixed")}
        report["decision_refit"]["adapted_refitted"] = bool(fit.get("adapted_refitted"))
        if fit.get("adapted_class_mix"):
            report["decision_refit"]["adapted_class_mix"] = fit["adapted_class_mix"]
    if out:
        with contextlib.nullcontext(staged) if staged is not None else Staged() as outputs:
            stage_outputs(report, cached, Path(out), figures, outputs)
    return report


def stage_outputs(report: dict, cached, out: Path, figures: bool, staged: Staged) -> None:
    """The JSON and its pictures (into a temporary folder beside their own), or, with ``--no-figures``, the
    pictures the replaced JSON listed, to remove (``pictures_of``); put in place together by ``staged.commit``."""
    folder = figures_folder(out)
    if figures:  # where they will be: the JSON is written first (a full disk names it, as before)
        report["figures"] = {name: str(folder / f"{name}.png") for name in FIGURE_NAMES}
    else:
        staged.remove_pictures(pictures_of(out, folder))
    staged.text(out, json_text(report) + "\n")
    if figures:
        from .figures import evaluation_figures
        try:
            drawn = evaluation_figures(report, cached, staged.folder(folder))
        except OutputError as error:
            raise staged.final(error) from None
        assert list(drawn) == list(FIGURE_NAMES), drawn  # what the JSON says


def distinct_fields(by) -> list[str]:
    """``--by`` fields, each once (matched case-insensitively, as a CSV column is): ``--by sex --by sex`` showed
    and stored the same table twice."""
    fields = [by] if isinstance(by, str) else list(by)
    return list({field.strip().lower(): field for field in reversed(fields)}.values())[::-1]


def refuse_refit_without_val(data, val_split: str, threshold, calibration) -> None:
    """Before any image is read: a decision refitted on ``val_split`` (a policy such as youden, a calibration)
    needs that split, and a CSV has none (its own images were read as "val", to be refused only once all were
    scored as those the decision was fitted on)."""
    refits = calibration is not None or (threshold is not None and str(threshold) != "saved"
                                         and not is_fixed_threshold(threshold, calibration))
    if not refits or Path(data).suffix.lower() != ".csv":
        return
    given = f"--calibration {calibration}" if calibration is not None else f"--threshold {threshold}"
    instead = "give a folder" if calibration is not None else "give a probability, or a folder"
    raise PneumoniaCNNError(f"{display_path(data)}: {given} refits on a {val_split} split, and a CSV has none (its "
                            f"images would be read as {val_split}: the evaluated images would be among the images "
                            f"the refitted decision is fitted on): {instead} with {val_split}/")


def _decision_for(bundle, sources, cached, evaluated_fingerprints, data, val_split, threshold, calibration, device,
                  cache_dir, engine, adapt_batch, save_as):
    """The decision ``--threshold``/``--calibration`` ask for; returns (bundle, fit). Only a decision fitted on
    images (a policy such as youden, a calibration) refuses to report on those images; a probability given as the
    threshold is fitted on none. The stored calibration, when kept, still refuses its own."""
    if save_as:
        check_save_as(bundle, save_as, sources)
    if calibration is None:  # the stored calibration is kept: its images are not unseen (checked before scoring)
        refuse_stored_overlap(bundle, cached, evaluated_fingerprints, calibration_only=True)
    if is_fixed_threshold(threshold, calibration):
        bundle, fit = fixed_decision(bundle, threshold, adapted=adapt_batch or bool(save_as))
    else:
        bundle, val, fit = refit_decision(bundle, data, val_split, None if threshold == "saved" else threshold,
                                          calibration, device, cache_dir, engine, adapted=adapt_batch or bool(save_as))
        refuse_overlap(cached, fit["fingerprints"], evaluated_fingerprints, val.paths, f"the refitted decision "
                       f"(split {val_split})")
    if save_as:
        log.info("refitted decision written to %s", display_path(save_refitted(bundle, fit, save_as)))
    return bundle, fit


def figures_folder(out: Path) -> Path:
    """Beside the JSON and named after it (``test_metrics.json``: ``test_figures/``), so that another evaluation
    written to the same folder under another name keeps its own pictures."""
    stem = out.stem[:-len("_metrics")] if out.stem.endswith("_metrics") else out.stem
    return out.parent / f"{stem}_figures"


def build_report(predictor: Predictor, cached, entries, notes, data, split, bootstrap, seed,
                 fingerprints=None) -> dict:
    labels = cached.labels
    duplicates = duplicate_groups(cached, fingerprints or file_fingerprints(cached.paths))
    probabilities = np.array([e["probability"] for e in entries])
    threshold = entries[0]["threshold"]
    decision = predictor.last_decision  # the one these entries were decided by
    # as decided (Decision.positive), also for an image given no label (not an X-ray): the threshold's metrics
    predicted = np.asarray(decision.positive(np.array([e["raw_score"] for e in entries])), dtype=bool)
    groups = cached.patients if has_patient_ids(cached.paths) else None
    report = {"checkpoint": [str(c.get("path")) for c in predictor.checkpoints], "model_id": predictor.model_id,
              "data": str(data), "split": split, "n_images": int(len(labels)),
              "class_names": list(predictor.class_names),
              "counts": {name: int((labels == i).sum()) for i, name in enumerate(predictor.class_names)},
              "n_patients": len(set(cached.patients)), "threshold": threshold, "prevalence": entries[0]["prevalence"],
              "threshold_policy": decision.policy, "calibration": decision.calibration.to_dict(),
              "scoring": predictor.scorer.description, "duplicates": duplicates,
              "notes": list(notes) + interval_notes(labels, predictor.class_names, groups)
              + duplicate_notes(duplicates, data) + resample_notes(bootstrap),
              "bootstrap": {"resamples": bootstrap, "seed": seed, "unit": "patient" if groups else "image"},
              "metrics": bootstrap_metrics(labels, probabilities, threshold, groups=groups, resamples=bootstrap,
                                           seed=seed, predicted=predicted),
              "skipped": [{"path": p, "reason": r} for p, r in cached.skipped]}
    if groups is not None:
        patient_labels, patient_scores, _ = per_patient(labels, probabilities, cached.patients)
        patient_predicted = per_patient(labels, predicted, cached.patients)[1]  # positive if any image is
        report["patient_metrics"] = bootstrap_metrics(patient_labels, patient_scores, threshold,
                                                      resamples=bootstrap, seed=seed, predicted=patient_predicted)
    flagged = [e["in_distribution"] is False for e in entries]
    report["ood"] = {"available": predictor.ood is not None, "flagged": int(sum(flagged)),
                     "fraction_flagged": float(np.mean(flagged)) if flagged else 0.0}
    report["predictions"] = [{"path": p, "label": int(y), "predicted": e["label"], "positive": bool(d),
                              "probability": e["probability"], "raw_score": e["raw_score"], "flagged": f,
                              "ood_score": e["ood_score"], **({"patient": patient} if groups is not None else {})}
                             for p, y, e, d, f, patient in zip(cached.paths, labels, entries, predicted, flagged,
                                                               cached.patients)]
    return report


FEW_REFIT_IMAGES = 100  # train's own floor for a validation split (--min-val-images)


def format_table(report: dict) -> str:
    metrics = report["metrics"]
    lines = [f"{evaluated_name(report['data'], report['split'])}: {report['n_images']} images "
             + ", ".join(f"{k} {v}" for k, v in report["counts"].items())
             + f"; {report['n_patients']} patients; threshold {report['threshold']:.3f} "
             f"({report['threshold_policy']}, {calibration_words(report['calibration']['method'])}"
             + (f", probabilities for a pneumonia rate of {report['prevalence']:.3f})"
                if report.get("prevalence") is not None else ")"),
             f"{'metric':<20}{'value':>9}   95% CI ({report['bootstrap']['unit']} bootstrap)"]
    for name in ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "roc_auc",
                 "pr_auc", "brier", "log_loss", "ece"):
        lines.append(metric_line(name, metrics[name], metrics["confusion_matrix"], report["class_names"]))
    cm = metrics["confusion_matrix"]
    lines.append(f"confusion matrix (rows true NORMAL/PNEUMONIA): [[{cm['tn']} {cm['fp']}] [{cm['fn']} {cm['tp']}]]")
    if "patient_metrics" in report:
        pm = report["patient_metrics"]
        lines.append(f"per patient ({pm['n_images']} patients): accuracy {pm['accuracy']['value']:.4f}  "
                     f"sensitivity {pm['sensitivity']['value']:.4f}  specificity {pm['specificity']['value']:.4f}  "
                     f"ROC AUC {pm['roc_auc']['value']:.4f}")
    ood = report.get("ood", {})
    if ood.get("available"):
        lines.append(f"out-of-distribution flags: {ood['flagged']} of {report['n_images']} "
                     f"({ood['fraction_flagged']:.1%})")
    lines += [f"note: {note}" for note in report.get("notes", [])]
    if report.get("decision_refit"):
        lines.append(refit_line(report))
    if report["skipped"]:
        lines.append(f"skipped {len(report['skipped'])} unreadable file(s)")
    if report.get("subgroups"):
        from .subgroups import format_subgroups
        lines += [format_subgroups(result) for result in report["subgroups"]]
    return "\n".join(lines)


def calibration_words(method: str) -> str:
    """"platt calibration"; an averaging ensemble's method says itself what it is ("mean of the members' calibrated
    probabilities (platt, platt)": it read "none calibration", though each member's calibration was applied)."""
    return f"{method} calibration" if method in CALIBRATION_METHODS else method


def refit_line(report: dict) -> str:
    """How ``--threshold``/``--calibration`` changed the decision for this evaluation."""
    fit = report["decision_refit"]
    method = calibration_words(report["calibration"]["method"])
    adapted = "; --adapt-batch's own decision refitted the same way" if fit.get("adapted_refitted") else ""
    adapted += f" ({fit['adapted_class_mix']})" if fit.get("adapted_class_mix") else ""
    if fit.get("fixed") is not None:
        return (f"decision set for this evaluation: the threshold ({report['threshold_policy']}), on the stored "
                f"{method}; a given probability, fitted on no images{adapted}")
    both = "calibration" in fit["refitted"]
    few = (f"; from fewer than {FEW_REFIT_IMAGES} images {'both are' if both else 'it is'} noisy (the run's own "
           f"decision was fitted on its whole validation split)") if fit["images"] < FEW_REFIT_IMAGES else ""
    what = (f"the threshold ({report['threshold_policy']}) and the {method}" if both else
            f"the threshold ({report['threshold_policy']}), on the stored {method}")
    return f"decision refitted on {fit['split']} ({fit['images']} images) for this evaluation: {what}{adapted}{few}"
