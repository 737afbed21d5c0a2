"""What ``adapt`` refuses before it starts, and what it warns of after, about a new site's images: labelled ones
it cannot split by patient, labelled ones the input checks flag (left out, as from --data), and an
out-of-distribution refit that rests on few of them."""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import replace

import numpy as np

from ..errors import PneumoniaCNNError
from ..fileio import display_path
from .fingerprint import file_fingerprints

# The fewest patients of a class the kept-out part takes (the verdict's ROC AUC and its bootstrap by patient);
# and the fewest each class must keep for fine-tuning, so that each of cross-validation's (at least 2,
# patient-grouped) folds has both classes to learn from and to score (with one patient of a class left, each
# fold had learnt from one class only: the number of epochs and the threshold were chosen on nothing).
MIN_KEPT_OUT_PATIENTS = 2
MIN_TUNING_PATIENTS = 2
# Below this many site images (unlabelled and labelled, each once), the refitted detector's references and flag
# bound rest on so few X-rays that, with some draws of the site's images, it flags far fewer images from outside
# the intended population than the source checkpoint's detector did; from it on, no draw measured did. Measured
# with the built-in model on shared/data/adult_xray_dev's adult X-rays (the figures: README, "adapt").
FEW_OOD_REFIT_IMAGES = 300
# The share of the site's images the source's detector flags from which adapt refuses (--accept-outside-population
# overrides): adult X-rays are flagged 93-100% by the built-in model, photographs 100%, but its own children framed
# otherwise (a 10% black border) can be flagged as much: the refusal asks, it cannot tell them apart.
SITE_OUTSIDE_LIMIT = 0.9
log = logging.getLogger("pneumonia_cnn.adaptation")


def kept_out_patients(patients: int, fraction: float) -> int:
    """How many of a class's ``patients`` the kept-out part takes (``adaptation._held_out_split``)."""
    return max(MIN_KEPT_OUT_PATIENTS, int(round(patients * fraction)))


def fewest_patients(fraction: float) -> int:
    """The fewest patients per class that leave MIN_TUNING_PATIENTS to fine-tune on once the kept-out part took
    its share (4 with the default 0.35)."""
    patients = MIN_KEPT_OUT_PATIENTS + MIN_TUNING_PATIENTS
    while patients - kept_out_patients(patients, fraction) < MIN_TUNING_PATIENTS:
        patients += 1
    return patients


def check_labelled_site(site, labelled, fraction: float) -> None:
    """Refuse labelled site images (an ``ImageList`` or the decoded ``CachedImages``) that cannot be split into a
    kept-out part and a part to fine-tune on, by patient; said before any image is decoded, and again after (an
    unreadable file may have left fewer)."""
    labels = np.asarray(site.labels).astype(int)
    counts = np.bincount(labels[labels >= 0], minlength=2)
    if len(labels) < 8 or min(counts) < 4:
        raise PneumoniaCNNError(f"{display_path(labelled)}: need at least 4 labelled images per class")
    if hasattr(site, "images"):  # decoded: only readable images (two empty files are not one image)
        refuse_conflicting_labels(site.paths, labels)
    names = list(getattr(site, "class_names", None) or ("NORMAL", "PNEUMONIA"))[:2]
    patients = [len({p for p, y in zip(site.patients, labels) if y == label}) for label in (0, 1)]
    need = fewest_patients(fraction)
    if min(patients) < need:
        found = ", ".join(f"{name} {count}" for name, count in zip(names, patients))
        raise PneumoniaCNNError(
            f"{display_path(labelled)}: need at least {need} patients per class ({found}): "
            f"{kept_out_patients(need, fraction)} are kept out to judge the adapted model, the rest fine-tune it "
            f"(a patient is read from the file name: person123_..., IM-0115-...; otherwise each image is one)")


def refuse_conflicting_labels(paths, labels) -> None:
    """The same image (by content) under both classes, refused as ``train`` refuses it: fine-tuning and the
    verdict had learnt and judged on both labels of it without a word."""
    seen = {}
    for path, label, fingerprint in zip(paths, labels, file_fingerprints(paths)):
        first = seen.setdefault(fingerprint, (path, int(label)))
        if first[1] != int(label):
            raise PneumoniaCNNError(f"{display_path(path)}: the same image as {display_path(first[0])} under the "
                                    f"other class; an image has one label")


def leave_out_flagged(site, folder, flag, intended_use, who: str = "adapt", what: str = "labelled ",
                      say=log.warning):
    """The decoded images (``CachedImages``) of ``folder`` less those the model-free input checks flag (blank,
    noise, colour; a DICOM of another modality, body part, view or age): adapt's labelled site images, as it leaves
    them out of --data, and train's training and validation images, before anything counts them (patients, the
    weights, the decision, the detector's references): ``flag(gray, meta, intended_use)`` gives an image's
    reasons. Said by ``say`` (a logger's ``warning``; None: silent, as on torchrun's other ranks) in one line
    naming the folder and the reasons; returns the kept images and how many were left out."""
    reasons = [flag(gray, meta, intended_use) for gray, meta in zip(site.images, site.metas())]
    flagged = [(path, found[0]) for path, found in zip(site.paths, reasons) if found]
    if not flagged:
        return site, 0
    tally = Counter(reason for _, reason in flagged).most_common()
    said = "; ".join(f"{count}: {reason}" for reason, count in tally[:3]) + ("; ..." if len(tally) > 3 else "")
    if say is not None:
        say("%s leaves out %d of the %d %simage(s) in %s that the input checks flag (%s; first: %s)", who,
            len(flagged), len(site.paths), what, display_path(folder), said, display_path(flagged[0][0]))
    keep = [index for index, found in enumerate(reasons) if not found]
    checked = [site.checked[index] for index in keep] if site.checked else []
    return replace(site, images=np.asarray(site.images)[keep], labels=np.asarray(site.labels)[keep],
                   paths=[site.paths[index] for index in keep], patients=[site.patients[index] for index in keep],
                   checked=checked), len(flagged)


def few_images_warning(result: dict) -> str | None:
    """One line when the out-of-distribution detector was refitted on fewer than FEW_OOD_REFIT_IMAGES site images
    (no measured figures: they are in the README)."""
    fitted = result.get("ood_fitted_on") or {}
    images = int(fitted.get("reference_images", 0)) + int(fitted.get("bound_images", 0))
    if not fitted or images >= FEW_OOD_REFIT_IMAGES:
        return None
    return (f"warning: the out-of-distribution detector was refitted on only {images} of the site's images (fewer "
            f"than {FEW_OOD_REFIT_IMAGES}); refitted on so few it can flag far fewer X-rays from outside the intended "
            f"population (adults, for one) than the source checkpoint's: adapt on at least {FEW_OOD_REFIT_IMAGES} of "
            f"the site's images before relying on its flag")


def check_site_population(data, outside: int, total: int, population: str, accept: bool) -> float:
    """The share of the site's images the source flags as outside its training population, refused from
    ``SITE_OUTSIDE_LIMIT`` on unless ``accept``: adapt refits the detector on the site, which then stops flagging
    it, while the model card still states ``population`` (adults were flagged 54/54 before adapting to adults,
    0/54 after; photographs 60/60, then 50 of 60 labelled)."""
    share = outside / total if total else 0.0
    if share < SITE_OUTSIDE_LIMIT:
        return share
    said = (f"{display_path(data)}: the source flags {outside} of the site's {total} image(s) ({share:.0%}) as outside "
            f"its training population ({population}); adapting refits its detector on them, which then stops "
            f"flagging such images while the model card still states that population")
    if not accept:
        raise PneumoniaCNNError(f"{said}: if these are chest X-rays of that population from another hospital ("
                                f"framing or exposure alone can be flagged as much), give --accept-outside-population; "
                                f"not if they are adults, other views or not X-rays")
    log.warning("warning: %s (--accept-outside-population)", said)
    return share


def adapt_batch_decision(source: dict, labelled, epochs: int = 0, refitted: bool = True) -> str:
    """What ``--adapt-batch`` decides with on the adapted checkpoint, in words (``info`` shows it)."""
    if labelled:
        changed = f"re-estimated on the site's images and fine-tuned for {epochs} epoch(s)" if epochs else \
            "re-estimated on the site's images (cross-validation chose no fine-tuning)"
        what = "the decision refitted on the site's labelled images" if refitted else \
            "the plain decision, kept by adapt (a given probability threshold; --recalibrate refits the calibration)"
        return f"{what} (the source's, fitted with AdaBN on its validation images, does not describe these " \
               f"weights, {changed})"
    if source.get("decision_adapted"):
        return "the source's, fitted with AdaBN on its validation images (each batch's statistics replace the site's)"
    return "the plain decision (the source checkpoint has none fitted with AdaBN)"


MAX_SENSITIVITY_DROP = 0.05  # a pneumonia detector that misses more pneumonia is not better for a site


def adaptation_verdict(before: dict, after: dict) -> tuple[bool, str]:
    """``adapt --labelled``'s verdict from the kept-out metrics before and after (``bootstrap_metrics``' dicts).
    Better: a ROC AUC higher by more than 0.005 with a balanced accuracy at the saved thresholds no lower, or an
    equal AUC with a higher balanced accuracy; either way with a sensitivity at most 0.05 lower. A higher AUC alone
    had been "better" while sensitivity fell 0.667 -> 0.500, and an equal balanced accuracy while it fell 1.000 ->
    0.000 (every kept-out pneumonia missed, and 27 of 30 other pneumonia X-rays called NORMAL)."""
    gain = after["roc_auc"]["value"] - before["roc_auc"]["value"]
    operating_gain = after["balanced_accuracy"]["value"] - before["balanced_accuracy"]["value"]
    sensitivity = before["sensitivity"]["value"], after["sensitivity"]["value"]
    # False when either is NaN; 1e-9: 0.90 - 0.85 is 0.05000000000000004 in floating point, and 0.05 is allowed
    misses_more = bool(sensitivity[0] - sensitivity[1] > MAX_SENSITIVITY_DROP + 1e-9)
    improved = ((gain > 0.005 and operating_gain >= 0) or (abs(gain) <= 0.005 and operating_gain > 0)) \
        and not misses_more
    change = f"ROC AUC {gain:+.3f}, balanced accuracy at the threshold {operating_gain:+.3f}"
    if improved:
        return True, f"adapted model is better on the kept-out images ({change})"
    why = " (it ranks better but decides worse at its threshold)" if gain > 0.005 and operating_gain < 0 else \
        f" (it misses more pneumonia: sensitivity {sensitivity[0]:.3f} -> {sensitivity[1]:.3f})" if misses_more else ""
    return False, (f"adapted model is NOT better on the kept-out images ({change}){why}: keep using the original "
                   f"model for this site")
