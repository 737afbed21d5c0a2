"""``adapt``: prepare a trained model for a new site before use.

1. AdaBN (Li et al., 2016): batch-norm statistics re-estimated on the site's unlabelled images.
2. With ``labelled`` (LABELLED_DIR/NORMAL, LABELLED_DIR/PNEUMONIA, a few dozen each): a patient-level part
   is kept out for the verdict; the rest fine-tunes the model with L2-SP regularisation (weights pulled
   toward the trained ones), a small learning rate and batch norm frozen at the adapted statistics. The
   number of epochs is chosen by k-fold cross-validation on the fine-tuning part (0 epochs is allowed:
   then nothing is fine-tuned); the threshold (and with ``recalibrate`` the calibration) is refitted on the
   out-of-fold scores.
3. The out-of-distribution detector and its flag bound are refitted on the site's images (half of them, drawn
   at random, as its references, the other half set the bound); the record says so (``ood_fitted_on``).
4. Before/after ROC AUC with 95% intervals on the kept-out part, and a plain verdict: never silently worse.
Every score here comes from the served forward (``ServedModel``: flips, channels) in float32.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold

from .calibration import MEAN_OF_MEMBERS, Decision, choose_threshold, fit_calibration, parse_threshold_policy
from .checkpoint import load_checkpoint, save_checkpoint
from .data.augment import AugmentConfig, augment_batch
from .data.cache import build_or_load
from .data.dataset import load_split, scan_unlabelled
from .data.fingerprint import file_fingerprints
from .data.loader import to_model_input
from .data.site_checks import (
    adapt_batch_decision,
    adaptation_verdict,
    check_labelled_site,
    check_site_population,
    few_images_warning,
    kept_out_patients,
    leave_out_flagged,
)
from .device import resolve_device
from .errors import PneumoniaCNNError
from .evaluation.metrics import bootstrap_metrics
from .fileio import display_path
from .inference import Bundle, Scorer, load_bundle, refuse_unfitted
from .inference.adabn import distinct_in_canonical_order, reestimate_batch_norm
from .inference.engines import TorchEngine
from .inference.predictor import MIN_ADAPT_BATCH, in_distribution
from .ood import OODDetector, flag_reasons, site_method, site_recipe, site_taps, training_population

log = logging.getLogger(__name__)
FINE_TUNE_AUGMENT = AugmentConfig(zoom=0.1, flip=True, rotation=5, contrast=0.15, brightness=0.05)
# The fewest site images (--data) adapt accepts. AdaBN: batch-norm statistics from fewer than --adapt-batch's
# 32 are too noisy to trust. The detector refit: it fits on half the images and cross-fits its k-NN scores
# (k = 10) in 5 folds, so each fold's scorer needs 10 references: 25 images at least; with 1 image it cannot
# be fitted at all, and a detector fitted on a handful would decide what "outside the training population"
# means from a handful. 32 covers both.
MIN_SITE_IMAGES = MIN_ADAPT_BATCH


def adabn(model, images: np.ndarray, device, batch_size: int = 32, tta: bool = False) -> int:
    """Re-estimate every batch-norm layer's statistics on ``images`` in place; returns layers reset."""
    return reestimate_batch_norm(model, images, device, tta, batch_size)


def served_logits(model, images, device, tta: bool, batch_size: int = 64) -> np.ndarray:
    """Raw logits of ``model`` as served (flips, channels), float32, for fold-by-fold cross-validation."""
    engine = TorchEngine([model], device, tta)
    out = [engine.run(np.asarray(images[start:start + batch_size]))[0][0]
           for start in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros(0)


def fine_tune(model, images, labels, device, epochs: int, lr: float = 3e-4, l2sp: float = 0.01, seed: int = 0,
              batch_size: int = 16, evaluate=None):
    """Fine-tune in place; ``evaluate(model, epoch)`` is called after each epoch (for cross-validation)."""
    anchor = [p.detach().clone() for p in model.parameters()]
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    generator, rng = torch.Generator().manual_seed(seed), np.random.default_rng(seed)
    positives = max(float(np.mean(labels)), 1e-3)
    pos_weight = torch.tensor((1 - positives) / positives, device=device)
    channels = int(getattr(model, "model_kwargs", {}).get("in_channels", 3))
    for epoch in range(1, epochs + 1):
        model.train()
        for module in model.modules():  # keep the adapted batch-norm statistics
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()
        order = rng.permutation(len(labels))
        for start in range(0, len(order), batch_size):
            chosen = np.sort(order[start:start + batch_size])
            x = augment_batch(to_model_input(torch.from_numpy(np.array(images[chosen])), device), FINE_TUNE_AUGMENT,
                              generator).expand(-1, channels, -1, -1)
            y = torch.as_tensor(labels[chosen], dtype=torch.float32, device=device)
            loss = F.binary_cross_entropy_with_logits(model(x), y, pos_weight=pos_weight)
            penalty = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor))
            optimiser.zero_grad(set_to_none=True)
            (loss + l2sp * penalty).backward()
            optimiser.step()
        if evaluate:
            evaluate(model, epoch)
    model.eval()
    return model


def choose_epochs(base_model, images, labels, groups, device, max_epochs: int, folds: int, seed: int, tta: bool):
    """Cross-validated AUC after each epoch (0 = no fine-tuning); returns the best epoch and out-of-fold logits."""
    folds = max(2, min(folds, int(min(np.bincount(labels)))))
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    oof = np.zeros((max_epochs + 1, len(labels)))
    for train_idx, test_idx in splitter.split(np.zeros(len(labels)), labels, groups):
        model = copy.deepcopy(base_model)
        oof[0, test_idx] = served_logits(model, images[test_idx], device, tta)

        def record(m, epoch, test_idx=test_idx):
            oof[epoch, test_idx] = served_logits(m, images[test_idx], device, tta)
        fine_tune(model, images[train_idx], labels[train_idx], device, max_epochs, seed=seed, evaluate=record)
    aucs = [float(roc_auc_score(labels, oof[e])) for e in range(max_epochs + 1)]
    best = int(np.argmax(aucs))
    if aucs[best] - aucs[0] < 0.005:  # a gain within noise does not justify changing the weights
        best = 0
    return best, aucs, oof[best]


def _held_out_split(labels, groups, fraction, seed):
    rng = np.random.default_rng(seed)
    held = np.zeros(len(labels), dtype=bool)
    for label in (0, 1):
        patients = sorted({g for g, y in zip(groups, labels) if y == label})
        rng.shuffle(patients)
        chosen = set(patients[:kept_out_patients(len(patients), fraction)])
        held |= np.array([g in chosen and y == label for g, y in zip(groups, labels)])
    return held


def adapt(checkpoint, data, out, labelled=None, device: str = "auto", recalibrate: bool = False, seed: int = 0,
          max_epochs: int = 12, folds: int = 4, held_out: float = 0.35, cache_dir=None,
          accept_outside_population: bool = False) -> dict:
    source = load_checkpoint(checkpoint)
    refuse_unfitted(source, "adapt")
    bundle, device = load_bundle(source), resolve_device(device)
    pre = bundle.preprocessing
    if labelled:  # refused before any image is decoded: "min() arg is an empty sequence" after AdaBN had been
        check_labelled_site(load_split(labelled, None, class_names=bundle.class_names), labelled, held_out)
    cached = build_or_load(scan_unlabelled(data), pre.size, pre.interpolation, pre.intensity, cache_dir=cache_dir)
    unlabelled, left_out, copies = in_population(bundle, cached)
    if len(unlabelled) < MIN_SITE_IMAGES:
        said = [f"{left_out} flagged"] * bool(left_out) + [f"{copies} copies of others counted once"] * bool(copies)
        counted = (" the input checks do not flag" if left_out else "") + (f" ({'; '.join(said)})" if said else "")
        raise PneumoniaCNNError(f"{display_path(data)}: {len(unlabelled)} distinct readable image(s){counted}; adapt "
                                f"needs at least {MIN_SITE_IMAGES} of the site's images (batch-norm statistics and the "
                                f"out-of-distribution refit from fewer are too noisy to trust)")
    inside = in_distribution(bundle, unlabelled, Scorer(bundle, device).score(unlabelled))  # by the source's flag
    outside = check_site_population(data, int((~inside).sum()), len(inside), training_population(bundle.intended_use),
                                    accept_outside_population)
    model = copy.deepcopy(bundle.models[0]).to(device)
    reset = adabn(model, unlabelled, device, tta=bundle.tta)
    result = {"checkpoint": str(source["path"]), "out": str(out), "unlabelled_images": len(unlabelled),
              "left_out_by_input_checks": left_out, "copies_counted_once": copies, "adabn_layers": reset,
              "fine_tune_epochs": 0, "outside_source_population": outside}
    if not reset:
        log.warning("%s has no batch-norm layers: AdaBN does not apply (use a model such as seed_bn or resnet18)",
                    source["model"]["name"])
    decision, site_images = bundle.decision, np.zeros((0, *pre.size), np.uint8)
    if labelled:
        model, decision, site_images = _adapt_with_labels(bundle, model, labelled, device, recalibrate, seed,
                                                          max_epochs, folds, held_out, cache_dir, result)
    adapted = replace(bundle, models=[model.cpu().eval()], decision=decision, ood=None)
    references, labelled_added = site_references(unlabelled, site_images)
    detector = _refit_ood(adapted, references, device, source, seed)
    result["ood_fitted_on"] = ood_fit_record(len(unlabelled), labelled_added)
    _save_adapted(source, adapted, detector, out, data, labelled, result)
    return result


def in_population(bundle: Bundle, cached) -> tuple[np.ndarray, int, int]:
    """The site's distinct images that the model-free input checks do not flag (blank, noise, colour; a DICOM of
    another modality, body part, view or age), as predict's batch adaptation uses them; how many were left out
    (their batch-norm statistics and OOD features would describe something other than the site's X-rays), and
    how many were copies of others."""
    images = np.asarray(cached.images)
    reasons = [flag_reasons(gray, meta, bundle.intended_use) for gray, meta in zip(images, cached.metas())]
    flagged = [(path, found[0]) for path, found in zip(cached.paths, reasons) if found]
    if flagged:
        log.warning("adapt leaves out %d of the site's %d image(s) that the input checks flag (first: %s: %s)",
                    len(flagged), len(images), display_path(flagged[0][0]), flagged[0][1])
    kept = images[[not found for found in reasons]]
    # each first copy, in the site's order (40 copies of one X-ray had been "the site's 40 images")
    distinct = kept[np.sort(distinct_in_canonical_order(kept))]
    if len(distinct) < len(kept):
        log.warning("adapt counts each image once, as --adapt-batch does: %d of the site's images are copies of "
                    "others (the same pixels under another name)", len(kept) - len(distinct))
    return distinct, len(flagged), len(kept) - len(distinct)


def _adapt_with_labels(bundle: Bundle, model, labelled, device, recalibrate, seed, max_epochs, folds, held_out,
                       cache_dir, result):
    pre = bundle.preprocessing
    site = build_or_load(load_split(labelled, None, class_names=bundle.class_names), pre.size, pre.interpolation,
                         pre.intensity, cache_dir=cache_dir)
    site, result["labelled_left_out_by_input_checks"] = leave_out_flagged(site, labelled, flag_reasons,
                                                                          bundle.intended_use)
    check_labelled_site(site, labelled, held_out)  # again: unreadable or flagged (as in --data) may leave fewer
    labels = site.labels.astype(int)
    images, groups = np.asarray(site.images), np.array(site.patients)
    held = _held_out_split(labels, groups, held_out, seed)
    tune_x, tune_y, tune_g = images[~held], labels[~held], groups[~held]
    epochs, cv_aucs, oof_logits = choose_epochs(model, tune_x, tune_y, tune_g, device, max_epochs, folds, seed,
                                                bundle.tta)
    if epochs:
        fine_tune(model, tune_x, tune_y, device, epochs, seed=seed)
    old = bundle.decision
    result.update(fine_tune_epochs=epochs, cv_auc_by_epoch=cv_aucs, labelled_images=int(len(site)),
                  kept_out_images=int(held.sum()), threshold_refitted=refits_threshold(old.policy),
                  threshold_policy=old.policy, calibration_refitted=bool(recalibrate))
    result["_site_fit"] = {"engine": "torch", "precision": "float32", "tta": bool(bundle.tta),
                           "device": getattr(device, "type", str(device)), "split": "labelled site",
                           "images": int(len(tune_y)), "data": str(labelled)}
    calibration = fit_calibration(tune_y, oof_logits, old.calibration.method if old.calibration.method != "none"
                                  else "platt") if recalibrate else old.calibration
    threshold = choose_threshold(tune_y, calibration.probabilities(oof_logits), old.policy) \
        if old.policy != MEAN_OF_MEMBERS else old.threshold
    decision = Decision(calibration, threshold, old.policy)
    tuned_paths = [p for p, h in zip(site.paths, held) if not h]
    result["_tuned"] = {"fingerprints": file_fingerprints(tuned_paths), "labels": [int(v) for v in tune_y],
                        "recalibrated": bool(recalibrate)}
    before = old.probabilities(served_logits(bundle.models[0], images[held], "cpu", bundle.tta))
    after = decision.probabilities(served_logits(model, images[held], device, bundle.tta))
    _verdict(labels[held], groups[held], before, old.threshold, after, decision.threshold, seed, result)
    return model, decision, images


def refits_threshold(policy: str) -> bool:
    """Whether the policy chooses the threshold from scores: an ensemble's mean of members keeps the members',
    and a given probability (train's default "0.5", evaluate --threshold 0.4) is that probability whatever the
    site's scores are."""
    return policy != MEAN_OF_MEMBERS and parse_threshold_policy(policy)[0] != "fixed"


def adapted_decision_fit(source_fit, site_fit: dict | None, threshold_refitted: bool, recalibrated: bool):
    """``decision_fit`` of the adapted checkpoint, in the shape ``evaluate --save-as`` writes: ``site_fit`` (the
    labelled site images whose out-of-fold scores refitted the decision) replaces the source's record when the
    calibration was refitted, or is added as ``threshold_refit`` when the threshold alone was; a
    ``threshold_fixed`` stays only while the threshold is still that given probability."""
    source_fit = dict(source_fit) if isinstance(source_fit, dict) else None
    if site_fit is None or not (threshold_refitted or recalibrated):
        return source_fit
    fixed = {} if threshold_refitted or not source_fit or "threshold_fixed" not in source_fit \
        else {"threshold_fixed": source_fit["threshold_fixed"]}
    if recalibrated:
        return dict(site_fit, **fixed)
    kept = {k: v for k, v in (source_fit or {}).items() if k not in ("threshold_fixed", "threshold_refit")}
    return dict(kept, threshold_refit=site_fit)


def _verdict(labels, groups, before, threshold_before, after, threshold_after, seed, result):
    keys = ("roc_auc", "balanced_accuracy", "sensitivity", "specificity", "accuracy")
    metrics_before = bootstrap_metrics(labels, before, threshold_before, groups=groups, resamples=1000, seed=seed)
    metrics_after = bootstrap_metrics(labels, after, threshold_after, groups=groups, resamples=1000, seed=seed)
    result["kept_out"] = {"before": {k: metrics_before[k] for k in keys}, "after": {k: metrics_after[k] for k in keys}}
    result["improved"], result["verdict"] = adaptation_verdict(metrics_before, metrics_after)


def site_references(unlabelled: np.ndarray, labelled: np.ndarray) -> tuple[np.ndarray, int]:
    """The site's images the detector is refitted on: the unlabelled ones, then the labelled ones not among them
    (a labelled image also in --data had counted twice), each once; and how many labelled ones that added."""
    images = np.concatenate([unlabelled, labelled])
    kept = np.sort(distinct_in_canonical_order(images))
    return images[kept], int((kept >= len(unlabelled)).sum())


def ood_fit_record(unlabelled: int, labelled: int) -> dict:
    """On what images ``_refit_ood`` fitted the detector: the site's, not the source's training and validation
    images (whose quantile ``info`` would otherwise name); the second half of a seeded permutation are its
    references, the first half (``bound_images``) set the flag bound."""
    total = unlabelled + labelled
    kinds = f"{unlabelled} unlabelled, {labelled} labelled" if labelled else "unlabelled"
    return {"images": "site", "site_images": int(unlabelled), "labelled_site_images": int(labelled),
            "reference_images": int(total - total // 2), "bound_images": int(total // 2),
            "text": f"the new site's {total} image(s) ({kinds}), not the training or validation images"}


def _refit_ood(adapted: Bundle, images: np.ndarray, device, source: dict, seed: int):
    """The detector refitted on the site's images (pseudo-labelled by the adapted model); half of them,
    drawn at random, set its threshold."""
    scores = Scorer(adapted, device, "auto", taps=site_taps(adapted.models[0])).score(images)
    labels = (scores.raw > 0).astype(int)
    order = np.random.default_rng(seed).permutation(len(images))
    fit, held = np.sort(order[len(order) // 2:]), np.sort(order[:len(order) // 2])

    def part(index):
        return {"features": [f[index] for f in scores.features], "logits": scores.raw[index],
                "pixels": images[index], "labels": labels[index]}
    quantile = float(source.get("config", {}).get("ood_quantile", 0.95))
    detector = OODDetector.fit(adapted.models[0], part(fit), part(held), quantile=quantile, seed=seed,
                               recipe=site_recipe(adapted.models[0]))
    # its k-NN references are these site images: METHOD would say "to the training images" in info and the report
    detector.method = site_method(f"{len(fit)} of the new site's {len(images)} images")
    return detector


def adapted_reference(source: dict, tuned: dict | None) -> dict:
    """What the adapted checkpoint's decision and weights were fitted on, for evaluate's refusal: the source's
    validation images (and the images its threshold was refitted on, when it was), and the labelled site images
    it was fine-tuned and refitted on, refused whatever is refitted later (its weights learnt from them). No
    validation scores: they were the source model's (or cross-validation models'), not the adapted one's, so
    drift and ensembles say they have none rather than compare against another model's (a reference of 28
    out-of-fold logits had drift alarm on the site's own images; without any, the refusal was lost)."""
    source_reference = source.get("reference") or {}
    source_val = source_reference.get("val") or {}
    prints, labels = list(source_val.get("fingerprints") or []), list(source_val.get("labels") or [])
    labels = labels if len(labels) == len(prints) else None
    if tuned is not None:
        prints += tuned["fingerprints"]
        labels = None if labels is None else labels + tuned["labels"]
    reference = {"val": {"fingerprints": prints, **({"labels": labels} if labels is not None else {})}} \
        if prints else {}
    if source_reference.get("threshold_fit") and tuned is None:  # the source's threshold, kept
        reference["threshold_fit"] = source_reference["threshold_fit"]
    return reference


def _save_adapted(source: dict, adapted: Bundle, detector, out, data, labelled, result):
    # labelled: the decision was refitted on the site, and fine-tuning changed the weights; the source's
    # --adapt-batch decision (fitted on its validation images) describes neither, so --adapt-batch uses the site's
    dropped = ("path", "training_state", "temperature", "reference") + (("decision_adapted",) if labelled else ())
    payload = {k: v for k, v in source.items() if k not in dropped}
    decision = adapted.decision
    payload.update(state_dict={k: v.detach().cpu() for k, v in adapted.models[0].state_dict().items()},
                   calibration=decision.calibration.to_dict(), threshold=decision.threshold,
                   threshold_policy=f"{decision.policy}" if labelled else source.get("threshold_policy", "0.5"),
                   ood=detector.state(), run_id=f"{source.get('run_id', 'model')}-adapted")
    reference = adapted_reference(source, result.pop("_tuned", None))
    if reference:
        payload["reference"] = reference
    decision_fit = adapted_decision_fit(source.get("decision_fit"), result.pop("_site_fit", None),
                                        bool(result.get("threshold_refitted")),
                                        bool(result.get("calibration_refitted")))
    if decision_fit is not None:
        payload["decision_fit"] = decision_fit
    payload["adaptation"] = {"site_data": str(data), "labelled": str(labelled) if labelled else None,
                             "site_images": result["unlabelled_images"],
                             "left_out_by_input_checks": result["left_out_by_input_checks"],
                             "copies_counted_once": result["copies_counted_once"],
                             "outside_source_population": result["outside_source_population"],
                             "adabn_layers": result["adabn_layers"], "fine_tune_epochs": result["fine_tune_epochs"],
                             "threshold_refitted_on_site": bool(result.get("threshold_refitted")),
                             "calibration_refitted_on_site": bool(result.get("calibration_refitted")),
                             "ood_fitted_on": result["ood_fitted_on"],
                             "adapt_batch_decision": adapt_batch_decision(
                                 source, labelled, result.get("fine_tune_epochs", 0),
                                 bool(result.get("threshold_refitted") or result.get("calibration_refitted"))),
                             "improved": result.get("improved"), "verdict": result.get("verdict")}
    save_checkpoint(payload, out)


def format_adaptation(result: dict) -> str:
    lines = [f"adapted {result['checkpoint']} -> {result['out']}",
             f"AdaBN: {result['adabn_layers']} batch-norm layer(s) re-estimated on {result['unlabelled_images']} "
             f"unlabelled image(s)" if result["adabn_layers"] else "AdaBN: the model has no batch-norm layers"]
    if "kept_out" in result:
        lines.append(f"fine-tuning: {result['fine_tune_epochs']} epoch(s) chosen by cross-validation on "
                     f"{result['labelled_images'] - result['kept_out_images']} labelled images "
                     f"(CV ROC AUC by epoch: {', '.join(f'{a:.3f}' for a in result['cv_auc_by_epoch'])})")
        for when in ("before", "after"):
            m = result["kept_out"][when]
            shown = "  ".join(f"{name} {m[key]['value']:.3f} [{m[key]['ci95'][0]:.3f}, {m[key]['ci95'][1]:.3f}]"
                              for key, name in (("roc_auc", "ROC AUC"), ("sensitivity", "sensitivity"),
                                                ("specificity", "specificity")))
            lines.append(f"{when:>6} on {result['kept_out_images']} kept-out images: {shown}")
        lines.append(result["verdict"])
    warning = few_images_warning(result)
    return "\n".join(lines + refit_lines(result) + ([warning] if warning else []))


def refit_lines(result: dict) -> list[str]:
    """What was refitted, as it was: the detector always (on the site's images), the decision only from labels."""
    ood = result["ood_fitted_on"]
    lines = [f"out-of-distribution detector refitted on {ood['text']}: {ood['reference_images']} as its references, "
             f"{ood['bound_images']} set its flag bound"]
    if "kept_out" not in result:
        return lines + ["decision threshold and calibration kept from the source checkpoint (refitting them needs "
                        "--labelled)"]
    kept_because = "an ensemble's mean of members" if result.get("threshold_policy") in (None, MEAN_OF_MEMBERS) \
        else f"a given probability, {result['threshold_policy']}, fitted on no images"
    threshold = "refitted on the labelled images' out-of-fold scores" if result.get("threshold_refitted") else \
        f"kept from the source checkpoint ({kept_because})"
    calibration = "refitted there too" if result.get("calibration_refitted") else \
        "kept from the source checkpoint (--recalibrate refits it)"
    return lines + [f"decision threshold {threshold}; calibration {calibration}"]
