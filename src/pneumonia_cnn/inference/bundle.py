"""The checkpoint bundle: model(s) + preprocessing + decision policy (calibration, threshold, OOD detector).

One checkpoint, or several (an ensemble). An ensemble's raw score is the mean of its members' raw logits and
gets one calibration and threshold fitted on the ensemble's own validation scores, which each member
carries (``reference``); members that carry none (earlier versions) or were validated on different images are
averaged in probability, each member's own calibration applied first, with the mean of their thresholds, and the
output says so. At a site's prevalence each such member's probability is moved from the rate it was calibrated at.
"""
from __future__ import annotations

import copy
import hashlib
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch.nn as nn

from ..calibration import (
    MEAN_OF_MEMBERS,
    MEMBERS_CALIBRATION,
    Calibration,
    Decision,
    decision_not_fitted,
    fit_decision,
    logit,
)
from ..checkpoint import build_model, load_checkpoint
from ..data.cache import preprocess_file_and_meta
from ..data.intensity import standardise_intensity
from ..data.readers import read_image_bytes, resize_gray
from ..errors import CheckpointError, ConfigError, PneumoniaCNNError, one_line
from ..fileio import display_path
from .sessions import add_weights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preprocessing:
    """File or array -> uint8 (H, W) at the model's size after its intensity standardisation."""
    size: tuple[int, int]
    channels: int = 3
    interpolation: str = "bilinear"
    intensity: str = "none"

    @classmethod
    def from_checkpoint(cls, checkpoint: dict) -> Preprocessing:
        pre = checkpoint["preprocessing"]
        return cls(tuple(pre["size"]), int(pre.get("channels", 3)), pre.get("interpolation", "bilinear"),
                   pre.get("intensity", "none"))

    def read_path(self, path):
        return preprocess_file_and_meta(path, self.size, self.interpolation, self.intensity)  # as the cache does

    def read_bytes(self, data: bytes, name: str = "upload"):
        gray, meta = read_image_bytes(data, name, self.size, self.interpolation)
        return standardise_intensity(gray, self.intensity), meta

    def from_gray(self, gray: np.ndarray) -> np.ndarray:
        if gray.shape != self.size:
            gray = resize_gray(gray, self.size, self.interpolation)
        return standardise_intensity(gray, self.intensity)


def decision_of(checkpoint: dict) -> Decision:
    """The checkpoint's decision policy (or that of its ``decision_adapted`` entry, stored the same way);
    checkpoints of earlier versions stored a temperature only."""
    if checkpoint.get("calibration"):
        calibration = Calibration.from_dict(checkpoint["calibration"])
    else:
        calibration = Calibration.from_temperature(checkpoint.get("temperature", 1.0))
    policy = str(checkpoint.get("threshold_policy", "0.5")).split(" (")[0].strip() or "0.5"
    return Decision(calibration, float(checkpoint.get("threshold", 0.5)), policy)


@dataclass
class Bundle:
    checkpoints: list[dict]
    models: list[nn.Module]
    preprocessing: Preprocessing
    decision: Decision
    tta: bool = False
    ood: object | None = None
    member_decisions: list[Decision] | None = None  # set only for ensembles of earlier versions' members
    notes: list[str] = field(default_factory=list)
    adapted_decision: Decision | None = None  # fitted on val scored after AdaBN on val: for --adapt-batch

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.checkpoints[0].get("class_names", ("NORMAL", "PNEUMONIA")))

    @property
    def intended_use(self) -> dict:
        return self.checkpoints[0].get("intended_use", {})

    @property
    def model_id(self) -> str:
        return "+".join(c.get("run_id", Path(c.get("path", "model")).stem) for c in self.checkpoints)

    @property
    def taps(self) -> list[tuple[str, str]]:
        return [tuple(t) for t in self.ood.taps] if self.ood is not None else []

    def combine(self, member_logits: np.ndarray) -> np.ndarray:
        """(members, N) raw logits -> (N,) the ensemble's raw score (the only member's for one model)."""
        if self.member_decisions is None:
            return np.asarray(member_logits, dtype=np.float64).mean(axis=0)
        probabilities = np.mean([d.probabilities(m) for d, m in zip(self.member_decisions, member_logits)], axis=0)
        return logit(probabilities)

    def explain_model(self) -> nn.Module:
        """A private copy of the first member for Grad-CAM: its hooks and gradients touch nothing shared."""
        return copy.deepcopy(self.models[0])

    def with_decision(self, decision: Decision, adapted: Decision | None = None) -> Bundle:
        return replace(self, decision=decision, adapted_decision=adapted or self.adapted_decision,
                       notes=list(self.notes))

    @property
    def averages_members(self) -> bool:
        """An ensemble stating the mean of its members' calibrated probabilities, at the mean of their thresholds
        (not a decision refitted on that mean by ``evaluate``)."""
        return self.member_decisions is not None and self.decision.policy == MEAN_OF_MEMBERS

    def member_rates(self) -> list[float]:
        """The pneumonia rate each averaged member was calibrated at; a one-line error naming a member without."""
        for index, (member, checkpoint) in enumerate(zip(self.member_decisions, self.checkpoints), start=1):
            if member.calibration.prior is None:
                raise ConfigError(f"prevalence: member {index} ({display_path(checkpoint.get('path', '?'))}) does not "
                                  f"record the pneumonia rate its probabilities were calibrated at (retrain or refit "
                                  f"it with this version)")
        return [float(member.calibration.prior) for member in self.member_decisions]

    def stated_rate(self) -> str:
        """The rate the probabilities are stated for when no prevalence moves them, in words."""
        if self.averages_members:
            rates = [member.calibration.prior for member in self.member_decisions]
            return f"each member's own rate ({', '.join('not recorded' if r is None else f'{r:.3f}' for r in rates)})"
        prior = self.decision.calibration.prior
        return f"the checkpoint's rate of {prior:.3f}" if prior is not None else "the checkpoint's rate"

    def state_rate(self, decision: Decision, rate: float, note: str) -> Decision:
        """``decision.with_prior``, or a one-line error that says why this bundle's probabilities cannot be moved."""
        if self.member_decisions is not None and decision.calibration.prior is None:
            raise ConfigError("prevalence: this ensemble's threshold was refitted on the mean of its members' "
                              "calibrated probabilities, each stated for its own member's rate and so the mean for no "
                              "one rate; refit its calibration too (--calibration platt)")
        return decision.with_prior(rate, note)

    def with_prevalence(self, rate: float, note: str) -> Bundle:
        """Probabilities (and thresholds) stated for a site whose pneumonia rate is ``rate``. An ensemble that averages
        its members moves each member's calibrated probability from the rate that member was calibrated at before
        the mean (their rates can differ; it had been refused as not recording a rate), and each member's threshold
        as that member's own decision moves (an operating point with its probabilities, a fixed probability not):
        the ensemble's threshold is their mean, as without a rate, and a fixed probability of the mean."""
        if not self.averages_members:
            adapted = self.adapted_decision
            return self.with_decision(self.state_rate(self.decision, rate, note),
                                      self.state_rate(adapted, rate, note) if adapted else None)
        rates = self.member_rates()
        members = [member.with_prior(rate, note) for member in self.member_decisions]
        threshold = float(np.mean([member.effective_threshold for member in members]))
        decision = Decision(self.decision.calibration, threshold, MEAN_OF_MEMBERS, float(rate), note)
        moved = (f"ensemble at a pneumonia rate of {rate:.3f}: each member's probability moved from its own rate "
                 f"({', '.join(f'{own:.3f}' for own in rates)}) before the mean; threshold {threshold:.3f} is the mean "
                 f"of the members' thresholds, each moved as its member's decision moves")
        return replace(self, decision=decision, member_decisions=members, notes=[*self.notes, moved])


def load_bundle(checkpoints) -> Bundle:
    """One checkpoint path/dict/run folder, or a list of them (an ensemble)."""
    if isinstance(checkpoints, (str, Path, dict)):
        checkpoints = [checkpoints]
    loaded = [c if isinstance(c, dict) else load_checkpoint(c) for c in checkpoints]
    if not loaded:
        raise PneumoniaCNNError("no checkpoint given")
    preprocessing = Preprocessing.from_checkpoint(loaded[0])
    tta = bool(loaded[0].get("tta", False))
    refuse_unlike_members(loaded)
    models = [build_model(c) for c in loaded]
    if len(loaded) > 1:
        refuse_repeated_weights(loaded, models)
    ood = _ood_detector(loaded[0])
    if len(loaded) == 1:
        adapted = loaded[0].get("decision_adapted")
        return Bundle(loaded, models, preprocessing, decision_of(loaded[0]), tta, ood,
                      adapted_decision=decision_of(adapted) if adapted else None)
    return _ensemble_bundle(loaded, models, preprocessing, tta, ood)


def warn_before_scoring(bundle: Bundle) -> None:
    """For a user scoring with it (``Predictor``), not for training's own end-of-run fit, which loads best.pt before
    its decision exists: best.pt named before the end-of-run steps, or last.pt (``info`` says it too); and a model
    ``adapt`` judged NOT better than its source on the site's kept-out images, which it saved all the same."""
    for checkpoint in bundle.checkpoints:
        where = display_path(checkpoint.get("path", "checkpoint"))
        if decision_not_fitted(checkpoint):
            log.warning("%s: weights saved while training, before its end-of-run steps: the threshold 0.5 is a "
                        "placeholder, with no calibration and no out-of-distribution flag (use the run's best.pt "
                        "once the run has finished, or finish it with pneumonia-cnn train --resume RUN)", where)
        adaptation = checkpoint.get("adaptation") if isinstance(checkpoint.get("adaptation"), dict) else {}
        if adaptation.get("improved") is False:  # said once by adapt; predict, serve and pacs said nothing
            log.warning("%s: adapt judged this model NOT better than its source on the site's kept-out images (%s); "
                        "the source checkpoint is the one to use for that site", where,
                        _verdict_figures(str(adaptation.get("verdict", ""))))


def _verdict_figures(verdict: str) -> str:
    """What adapt's verdict says in brackets, all of it (the sensitivity that fell, after the AUC and balanced
    accuracy that alone read as no loss), without the brackets that ``warn_before_scoring`` puts back."""
    return verdict.partition(" images (")[2].rpartition(": keep using")[0].rstrip(")") or "see info"


def refuse_unfitted(checkpoint: dict, command: str) -> None:
    """``command`` builds on the checkpoint's decision: weights saved before their run's end-of-run steps have
    none (``adapt`` had made of a last.pt's placeholder 0.5 a model that labelled with no warning at all)."""
    if decision_not_fitted(checkpoint):
        raise PneumoniaCNNError(f"{display_path(checkpoint.get('path', 'checkpoint'))}: weights saved while training, "
                                f"before its end-of-run steps (no decision fitted: the threshold 0.5 is a "
                                f"placeholder); {command} needs a finished run's best.pt (finish the run with "
                                f"pneumonia-cnn train --resume RUN)")


def _classes_of(checkpoint: dict) -> tuple[str, ...]:
    return tuple(checkpoint.get("class_names", ("NORMAL", "PNEUMONIA")))


def _input_differences(member: dict, first: dict) -> list[str]:
    """What an ensemble member's input differs in from the first member's, each as "field member's vs first's"."""
    def size(value):
        return str(value[0]) if len(set(value)) == 1 else "x".join(str(v) for v in value)

    mine, theirs = Preprocessing.from_checkpoint(member), Preprocessing.from_checkpoint(first)
    differences = [f"{name} {shown(getattr(mine, name))} vs {shown(getattr(theirs, name))}"
                   for name, shown in (("size", size), ("channels", str), ("interpolation", str), ("intensity", str))
                   if getattr(mine, name) != getattr(theirs, name)]
    flips = bool(member.get("tta", False)), bool(first.get("tta", False))
    if flips[0] != flips[1]:
        differences.append("test-time flips {} vs {}".format(*("on" if f else "off" for f in flips)))
    return differences


def refuse_unlike_members(loaded) -> None:
    """An ensemble averages one class's score over models that read the same input: a member with other classes
    (or another positive class: the second name) or other preprocessing is refused in one line naming it and what
    differs, with both values. Only the first member's classes are checked against the data, and a member trained
    on COVID/NORMAL folders had its P(NORMAL) averaged with P(PNEUMONIA)."""
    first, classes = loaded[0], _classes_of(loaded[0])
    for member in loaded[1:]:
        where = f"{display_path(member.get('path', '?'))}: "
        theirs = f"{display_path(first.get('path', '?'))}'s"
        # without regard to case, as class folders are matched (a model's NORMAL reads `normal/`)
        if [c.casefold() for c in _classes_of(member)] != [c.casefold() for c in classes]:
            raise PneumoniaCNNError(
                f"{where}classes {', '.join(_classes_of(member))} (positive {_classes_of(member)[-1]}) differ from "
                f"{theirs} {', '.join(classes)} (positive {classes[-1]}); an ensemble averages one class's score: "
                f"its members need the same classes")
        differences = _input_differences(member, first)
        if differences:
            raise PneumoniaCNNError(f"{where}its input differs from {theirs} ({', '.join(differences)}); an ensemble "
                                    f"needs the same input")


def refuse_repeated_weights(loaded, models, purpose: str = "an ensemble needs different models") -> None:
    """An ensemble's members must differ: a copy of a checkpoint under another name averaged one model with itself
    and was reported as an ensemble of two (``compare`` tested a copy against itself: p = 1)."""
    seen = {}
    for checkpoint, model in zip(loaded, models):
        first = seen.setdefault(add_weights(hashlib.sha256(), model).hexdigest(), checkpoint)
        if first is not checkpoint:
            raise PneumoniaCNNError(f"{display_path(checkpoint.get('path', '?'))}: holds the same weights as "
                                    f"{display_path(first.get('path', '?'))}; {purpose}")


def _ood_detector(checkpoint: dict):
    return ood_detector_of(checkpoint) if checkpoint.get("ood") else None


def ood_detector_of(checkpoint: dict):
    """The checkpoint's OOD detector, or a CheckpointError naming the file when its state cannot be read, or
    holds a value scoring cannot use (the field named, as ``checkpoint.check_checkpoint`` names the others)."""
    from ..ood import InvalidState, OODDetector
    try:
        return OODDetector.from_state(checkpoint["ood"])
    except InvalidState as invalid:
        raise CheckpointError(f"{display_path(checkpoint.get('path', '?'))}: not a usable checkpoint: {invalid}"
                              ) from None
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as error:
        reason = f"no {error}" if isinstance(error, KeyError) else one_line(error, limit=120)
        raise CheckpointError(f"{display_path(checkpoint.get('path', '?'))}: not a usable checkpoint: ood: not a "
                              f"detector this version can read ({reason})") from None


def _refitted_members(loaded) -> list[str]:
    """Notes naming the members whose threshold ``evaluate --save-as`` refitted on other images: the ensemble
    fits its own on the validation scores its members share, and a refit's images are not stored with scores."""
    notes = []
    for index, checkpoint in enumerate(loaded, start=1):
        reference = checkpoint.get("reference") or {}
        fit = reference.get("threshold_fit")
        if fit and set(fit.get("fingerprints") or []) != set((reference.get("val") or {}).get("fingerprints") or []):
            notes.append(f"member {index}'s threshold was refitted on {fit.get('split', 'other')} images "
                         f"({len(fit.get('fingerprints') or [])}); the ensemble's is fitted on the validation "
                         "images its members share, not on those")
            log.warning("%s", notes[-1])
    return notes


def _ensemble_bundle(loaded, models, preprocessing, tta, ood) -> Bundle:
    """Fit the ensemble's own decision on its members' stored validation scores when they share the
    same validation images; otherwise fall back to averaging (and say so)."""
    references = [(c.get("reference") or {}).get("val") or {} for c in loaded]
    if all(r.get("fingerprints") and r.get("raw_scores") and r.get("labels") for r in references) and all(
            r["fingerprints"] == references[0]["fingerprints"] for r in references):
        members = np.stack([np.asarray(r["raw_scores"], dtype=np.float64) for r in references])
        labels = np.asarray(references[0]["labels"])
        first = decision_of(loaded[0])
        decision = fit_decision(labels, members.mean(axis=0), first.policy, first.calibration.method)
        adapted = None
        if all(r.get("adapted_raw_scores") for r in references):
            adapted_members = np.mean([r["adapted_raw_scores"] for r in references], axis=0)
            adapted = fit_decision(labels, adapted_members, first.policy, first.calibration.method)
        note = (f"ensemble of {len(loaded)}: calibration and threshold fitted on the ensemble's own "
                f"validation scores ({len(labels)} images)")
        unfitted = [f"ensemble of {len(loaded)}: on its members' validation scores, {decision.calibration.note}"
                    ] if decision.calibration.note else []
        for line in unfitted:
            log.warning("%s", line)
        return Bundle(loaded, models, preprocessing, decision, tta, ood,
                      notes=[note, *unfitted, *_refitted_members(loaded)], adapted_decision=adapted)
    member_decisions = [decision_of(c) for c in loaded]
    threshold = float(np.mean([d.threshold for d in member_decisions]))
    methods = ", ".join(member.calibration.method for member in member_decisions)
    # the mean is not recalibrated (scale 1, bias 0) and is stated for no one rate (prior None): a site's rate moves
    # each member from its own (Bundle.with_prevalence), never the mean a second time
    calibration = Calibration(f"{MEMBERS_CALIBRATION} ({methods})")
    note = (f"ensemble of {len(loaded)}: members do not share stored validation scores (checkpoints of an "
            f"earlier version, or different validation images); each member's calibration applied ({methods}) and "
            f"the probabilities averaged, threshold {threshold:.3f} is the mean of the members' and was not fitted "
            f"on the ensemble")
    log.warning(note)
    return Bundle(loaded, models, preprocessing, Decision(calibration, threshold, MEAN_OF_MEMBERS), tta, ood,
                  member_decisions, [note])

