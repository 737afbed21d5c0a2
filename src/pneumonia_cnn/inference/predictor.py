"""``Predictor``: files, uploads or arrays -> decisions, through the one scorer.

It adds to the scorer what a caller needs around a probability: reading files, the label at the threshold,
the out-of-distribution flag with its reasons, a site's prevalence (given, or estimated from the batch by
EM) and, on request, batch-norm statistics re-estimated on the batch being scored (AdaBN).
"""
from __future__ import annotations

import logging
import numbers
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import numpy as np

from ..calibration import estimate_prior, estimate_prior_of_members, parse_prevalence, shown_rate
from ..errors import ConfigError, PneumoniaCNNError
from ..ood.checks import withholds_label
from .adabn import (
    MIN_ADAPT_PER_CLASS,
    adapt_batch_norm,
    adapt_each_member,
    distinct_in_canonical_order,
    fewest_of_a_class,
    has_batch_norm,
    member_pseudo_labels,
)
from .bundle import Bundle, load_bundle, warn_before_scoring
from .engines import INT8_ENGINES
from .files import decode_files
from .scorer import Scorer, Scores

log = logging.getLogger(__name__)
MIN_ADAPT_BATCH = 32  # fewer images give batch-norm statistics too noisy to trust (README, "Decision")
# EM (Saerens et al.) on one image always ends at a rate of 0 or 1 (the likelihood is linear in the rate): AdaBN's floor
MIN_ESTIMATE_BATCH = 32
# files that predict decodes and scores at a time (at least --batch-size): about 10 MB of pixels, rows every
# second or so; 32 at a time switched between the decoding threads and ONNX Runtime so often that 2,000 images
# took 1.6x the CPU time (measured on this 2-core machine; 256: within about 10% of scoring all at once)
STREAM_CHUNK = 256


@dataclass
class Prediction:
    path: str
    probability: float | None = None
    label: str | None = None
    threshold: float | None = None
    in_distribution: bool | None = None
    ood_score: float | None = None
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    model: str = ""
    raw_score: float | None = None
    prevalence: float | None = None  # the pneumonia rate the probability is stated for
    # what decided, in every output (it was on stderr only); after the fields above, whose order consumers rely on
    prevalence_source: str | None = None  # "calibration images", "given", "estimated from N images (EM)", or why not
    engine: str | None = None  # the engine and precision that scored it (onnx-int8 / int8 moves probabilities)
    precision: str | None = None
    batch_adapted: bool | None = None  # batch-norm statistics re-estimated on this image's batch (--adapt-batch)
    batch_adaptation: str | None = None  # what --adapt-batch did to this image's batch, or why not ("" unasked)
    ood_threshold: float | None = None  # the detector's cut-off: a score above it is flagged (alone, says little)

    def to_dict(self) -> dict:
        return asdict(self)


class Predictor:
    """One checkpoint, or several (an ensemble), ready to turn pixels into decisions."""

    def __init__(self, checkpoints, device: str = "auto", amp: str = "off", engine: str = "auto",
                 prevalence=None, adapt_batch: bool = False):
        bundle = checkpoints if isinstance(checkpoints, Bundle) else load_bundle(checkpoints)
        warn_before_scoring(bundle)
        self.prevalence = parse_prevalence(prevalence)
        if isinstance(self.prevalence, float):
            bundle = bundle.with_prevalence(self.prevalence, "given")
        self.batch_prevalence = None  # what a service's batches do, for its single-image predictor (answer_single)
        self.adapt_batch = bool(adapt_batch)
        if self.adapt_batch and not has_batch_norm(bundle.models[0]):
            raise PneumoniaCNNError(f"--adapt-batch: model {bundle.checkpoints[0]['model']['name']} has no batch-norm "
                                    f"layers to re-estimate (use a model such as seed_bn or resnet18_narrow)")
        if self.adapt_batch and engine in INT8_ENGINES:  # the adapted weights have no int8 graph: it failed per batch
            raise PneumoniaCNNError(f"--adapt-batch with --engine {engine}: batch adaptation re-estimates the "
                                    f"batch-norm statistics, which an int8 graph has folded into its quantised "
                                    f"weights; use --engine onnx or torch")
        self.bundle = bundle
        self.engine_name, self.amp = engine, amp
        self.scorer = Scorer(bundle, device, engine, amp)
        self.notes = list(bundle.notes)
        self.last_notes: list[str] = []
        self.last_decision = bundle.decision

    # ---------- what the model expects and promises
    @property
    def checkpoints(self):
        return self.bundle.checkpoints

    @property
    def models(self):
        return self.bundle.models

    @property
    def device(self):
        return self.scorer.device

    @property
    def preprocessing(self) -> dict:
        return self.bundle.checkpoints[0]["preprocessing"]

    @property
    def size(self) -> tuple[int, int]:
        return self.bundle.preprocessing.size

    @property
    def channels(self) -> int:
        return self.bundle.preprocessing.channels

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.bundle.class_names

    @property
    def threshold(self) -> float:
        return self.bundle.decision.effective_threshold

    @property
    def model_id(self) -> str:
        return self.bundle.model_id

    @property
    def ood(self):
        return self.bundle.ood

    def metadata(self) -> dict:
        decision = self.bundle.decision
        return {"model": [c["model"]["name"] for c in self.checkpoints], "run_id": self.model_id,
                "preprocessing": {k: v for k, v in self.preprocessing.items()}, "class_names": list(self.class_names),
                "threshold": self.threshold, "decision": decision.to_dict(), "tta": self.bundle.tta,
                "scoring": self.scorer.description, "ood": self.ood is not None,
                "intended_use": _public_intended_use(self.bundle.intended_use), "notes": self.notes,
                "prevalence": self.prevalence_mode()}

    def prevalence_mode(self) -> dict:
        """The rate the probabilities are stated for, as configured: ``decision.prior`` alone showed null under
        ``--prevalence estimate``, as if none had been asked for."""
        if "estimate" in (self.prevalence, self.batch_prevalence):
            return {"mode": "estimate", "rate": None,
                    "description": f"estimated from each batch scored together, by EM (Saerens et al. 2002) on its "
                                   f"distinct in-distribution images when there are at least {MIN_ESTIMATE_BATCH}; "
                                   f"single images and smaller batches: stated for {self.bundle.stated_rate()}"}
        if isinstance(self.prevalence, float):
            return {"mode": "given", "rate": self.prevalence,
                    "description": f"stated for a pneumonia rate of {self.prevalence:.3f} (given)"}
        return {"mode": "calibration", "rate": self.bundle.decision.calibration.prior,
                "description": f"stated for {self.bundle.stated_rate()}, that of the images calibrated on"}

    def answer_single(self, batch_prevalence) -> Predictor:
        """This predictor answers single images for a service whose batches are scored with ``batch_prevalence``:
        under "estimate" its notes and metadata say that one image cannot estimate a rate (they were empty, and
        /model showed a null prior), as predict's notes do for a batch too small."""
        self.batch_prevalence = parse_prevalence(batch_prevalence)
        return self

    # ---------- inputs
    def preprocess_path(self, path):
        return self.bundle.preprocessing.read_path(path)

    def preprocess_bytes(self, data: bytes, name: str = "upload"):
        return self.bundle.preprocessing.read_bytes(data, name)

    # ---------- pixels -> decisions
    def score(self, pixels_uint8, batch_size: int = 64, progress: bool = False) -> Scores:
        return self.scorer.score(pixels_uint8, batch_size, progress)

    def probabilities_from_pixels(self, pixels_uint8) -> np.ndarray:
        return self.scorer.score(np.asarray(pixels_uint8)).probabilities

    def predict_arrays(self, images, batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """Probabilities for preprocessed uint8 images (N, H, W) such as a cached split."""
        return self.scorer.score(images, batch_size, progress).probabilities

    def assess(self, pixels_uint8, metas=None, batch_size: int = 64, progress: bool = False
               ) -> tuple[list[dict], list[str]]:
        """Everything about each image from one scoring pass (and, when asked, the batch-level steps), and
        notes on what was done to the whole batch."""
        pixels = np.asarray(pixels_uint8)
        scores = self.scorer.score(pixels, batch_size, progress)
        checks = self.flags(pixels, scores, metas)
        decision, notes, recorded = self.bundle.decision, [], {"batch_adapted": False, "batch_adaptation": ""}
        if self.adapt_batch or self.prevalence == "estimate":
            scores, decision, notes, recorded = self._batch_steps(pixels, scores, checks, batch_size)
        self.last_decision = decision  # what evaluate's report states (the batch-adapted one with --adapt-batch)
        threshold = decision.effective_threshold
        # the pneumonia rate the probability is stated for, beside it in every output (None: not recorded)
        rate = decision.prior if decision.prior is not None else decision.calibration.prior
        recorded = {"prevalence_source": decision.prior_note if decision.prior is not None else "calibration images",
                    "engine": self.scorer.engine.name, "precision": self.scorer.engine.precision, **recorded}
        names = self.class_names
        entries = [{"probability": float(p), "raw_score": float(r),
                    "label": None if withholds_label(check["warnings"]) else names[1] if positive else names[0],
                    "threshold": threshold, "prevalence": None if rate is None else float(rate), **check, **recorded}
                   for p, r, positive, check in zip(scores.probabilities, scores.raw, decision.positive(scores.raw),
                                                    checks)]
        return entries, self.batch_notes() + notes

    def flags(self, pixels, scores: Scores, metas=None) -> list[dict]:
        return batch_checks(self.bundle, pixels, scores, metas)

    def check_inputs(self, pixels_uint8, metas=None) -> list[dict]:
        pixels = np.asarray(pixels_uint8)
        return self.flags(pixels, self.scorer.score(pixels), metas)

    def _batch_steps(self, pixels, scores: Scores, checks, batch_size):
        """AdaBN on the in-distribution part of the batch, then the batch's prevalence by EM; (scores, decision,
        notes, what each image's row records of them)."""
        inside = np.array([c["in_distribution"] is not False for c in checks])
        decision, adaptation, estimation, adapted = self.bundle.decision, [], [], False
        if self.adapt_batch:
            scores, decision, adapted = self._adapt_step(pixels, scores, inside, batch_size, adaptation)
        if self.prevalence == "estimate":
            scores, decision = self._estimate_step(pixels, scores, decision, inside, estimation)
        if decision is not self.bundle.decision or self.adapt_batch:
            scores = Scores(scores.raw, decision.probabilities(scores.raw), scores.members, scores.features)
        recorded = {"batch_adapted": adapted, "batch_adaptation": "; ".join(adaptation)}
        if estimation and decision.prior is None:  # not estimated, and why
            recorded["prevalence_source"] = estimation[0]
        flagged = int((~inside).sum())
        mostly = [f"{flagged} of the batch's {len(inside)} images are flagged out of distribution: the batch steps "
                  f"use only the {len(inside) - flagged} others (each distinct image once), which may come from the "
                  f"same other population (each row's flag is its own)"] if 2 * flagged > len(inside) else []
        return scores, decision, mostly + adaptation + estimation, recorded

    def _adapt_step(self, pixels, scores: Scores, inside, batch_size, notes):
        """AdaBN on the batch's distinct in-distribution images when there are enough; (scores, decision,
        whether it adapted)."""
        distinct = distinct_in_canonical_order(pixels[inside])  # a file sent twice counts once
        count = len(distinct)
        if count < MIN_ADAPT_BATCH:
            notes.append(f"not adapted: {count} in-distribution image{'s' * (count != 1)}, fewer than "
                         f"{MIN_ADAPT_BATCH}")
            return scores, self.bundle.decision, False
        pseudo = self.bundle.decision.positive(scores.raw[inside])
        each_alone = len(self.bundle.models) > 1 and self.bundle.adapted_decision is not None
        members = member_pseudo_labels(self.bundle, scores.members[:, inside]) if each_alone else []
        for who, labels in [("", pseudo)] + [(f"member {i} alone: ", m) for i, m in enumerate(members, start=1)]:
            fewer, positive = fewest_of_a_class(labels, distinct)
            if fewer < MIN_ADAPT_PER_CLASS:  # re-estimated on one class, every score moves (NORMAL-only: FP)
                name = self.class_names[1] if positive else self.class_names[0]
                notes.append(f"not adapted: {who}{fewer} of the {count} in-distribution images scored {name} before "
                             f"adaptation, fewer than {MIN_ADAPT_PER_CLASS}: the validation images' class mix cannot "
                             f"be drawn from this batch")
                return scores, self.bundle.decision, False
        rate = (self.bundle.adapted_decision or self.bundle.decision).calibration.prior
        # an ensemble: each member as it was when it stored the adapted scores its decision is fitted on
        bundle = adapt_each_member(self.bundle, pixels[inside], members) if each_alone else \
            adapt_batch_norm(self.bundle, pixels[inside], pseudo, rate)
        adapted = Scorer(bundle, self.device, self.scorer.engine.name, self.amp, cache=False)  # this batch's only
        notes.append(f"batch-norm statistics re-estimated on this batch ({count} "
                     f"in-distribution images, AdaBN at the validation images' class mix)")
        if self.bundle.adapted_decision is not None:  # fitted on val, adapted to val
            return adapted.score(pixels, batch_size), self.bundle.adapted_decision, True
        why = "refitted on the site's labelled images by adapt" if (self.checkpoints[0].get("adaptation") or {}).get(
            "labelled") else "a checkpoint of an earlier version"
        notes.append(f"the threshold and calibration were fitted without batch adaptation ({why})")
        return adapted.score(pixels, batch_size), self.bundle.decision, True

    def _estimate_step(self, pixels, scores: Scores, decision, inside, notes):
        """The batch's pneumonia rate by EM on its distinct in-distribution images when there are enough, else
        ``decision`` as is: a file sent twice counts once, as in AdaBN (32 copies of one NORMAL image were
        "32 images", and its probability fell from 0.034 to 0.000). An ensemble averaging its members moves each
        member from its own rate (``Bundle.with_prevalence``), in the EM too. Returns (scores, decision)."""
        kept = np.flatnonzero(inside)[distinct_in_canonical_order(pixels[inside])]
        count, prior, bundle = len(kept), decision.calibration.prior, self.bundle
        if count < MIN_ESTIMATE_BATCH:
            notes.append(f"prevalence not estimated: {count} in-distribution image{'s' * (count != 1)}, fewer than "
                         f"{MIN_ESTIMATE_BATCH}; probabilities stated for {bundle.stated_rate()}")
            return scores, decision
        how = f"estimated from {count} images (EM)"
        if bundle.averages_members:
            rate = estimate_prior_of_members([member.calibration.probabilities(raw[kept]) for member, raw
                                              in zip(bundle.member_decisions, scores.members)], bundle.member_rates())
            moved = bundle.with_prevalence(rate, how)
            scores = Scores(moved.combine(scores.members), scores.probabilities, scores.members, scores.features)
            decision = moved.decision
        else:
            base = decision.calibration.probabilities(scores.raw[kept])
            rate = estimate_prior(base, prior or float(np.mean(base)))
            decision = bundle.state_rate(decision, rate, how)
        notes.append(f"probabilities stated for a pneumonia rate of {rate:.3f}, estimated from this batch "
                     f"({count} in-distribution images, EM of Saerens et al. 2002)")
        return scores, decision

    def predict_files(self, paths, batch_size: int = 32, progress: bool = False) -> list[Prediction]:
        """Read, preprocess and predict files; unreadable files get ``error`` and the rest go on. Notes on
        the whole batch (prevalence, adaptation, ensembles) are logged and kept in ``last_notes``."""
        return [p for chunk in self.iter_predictions(paths, batch_size, progress) for p in chunk]

    def iter_predictions(self, paths, batch_size: int = 32, progress: bool = False) -> Iterator[list[Prediction]]:
        """``predict_files``' predictions in order, a list per ``STREAM_CHUNK`` files as they are scored, each
        chunk's pixels dropped before the next is read: memory stays that of one chunk, and a caller can show
        each list at once (all were kept and printed at the end: 750 MB for 4,137 images, and an interrupt
        showed nothing). ``--adapt-batch`` and ``--prevalence estimate`` need every image: one list, at the end."""
        paths = list(paths)
        if self.adapt_batch or self.prevalence == "estimate":
            decoded = [item for chunk in decode_files(paths, self.bundle.preprocessing, batch_size) for item in chunk]
            yield self._predict_decoded(decoded, batch_size, progress)
            self._log_notes()
            return
        self.last_notes = self.batch_notes()
        self._log_notes()  # known before any image: nothing here depends on the batch
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(paths), desc="scoring", unit="image", leave=False, disable=None)
        try:
            for chunk in decode_files(paths, self.bundle.preprocessing, max(batch_size, STREAM_CHUNK)):
                predictions = self._predict_decoded(chunk, batch_size)
                if bar is not None:
                    bar.update(len(chunk))
                yield predictions
        finally:
            if bar is not None:
                bar.close()

    def _predict_decoded(self, decoded, batch_size: int, progress: bool = False) -> list[Prediction]:
        """Predictions for decoded files, scored together (``assess``); an unreadable file gets its reason."""
        good = [item for item in decoded if item.pixels is not None]
        entries, self.last_notes = [], self.batch_notes()
        if good:
            pixels = np.stack([item.pixels for item in good])
            entries, self.last_notes = self.assess(pixels, [item.meta for item in good], batch_size, progress)
        entries = iter(entries)
        return [Prediction(item.path, model=self.model_id, **next(entries)) if item.pixels is not None
                else Prediction(item.path, error=item.error, model=self.model_id) for item in decoded]

    def _log_notes(self) -> None:
        for note in self.last_notes:
            log.info("%s", note)

    def batch_notes(self) -> list[str]:
        notes = list(self.notes)
        if isinstance(self.prevalence, float):
            notes.append(f"probabilities stated for a pneumonia rate of {shown_rate(self.prevalence)} (given)")
        if self.batch_prevalence == "estimate" and self.prevalence is None:  # a service's single image
            notes.append(f"prevalence not estimated: a single image cannot estimate a pneumonia rate (a batch scored "
                         f"together of at least {MIN_ESTIMATE_BATCH} in-distribution images can); probabilities "
                         f"stated for {self.bundle.stated_rate()}")
        return notes


def batch_checks(bundle, pixels, scores: Scores, metas=None) -> list[dict]:
    """The out-of-distribution score and flag, and the model-free input checks, per image: what ``--adapt-batch``
    leaves out, and what the end of training leaves out the same way when it fits the adapted decision."""
    from ..ood import flag_message, flag_reasons, input_warnings
    metas = metas if metas is not None else [None] * len(pixels)
    ood_scores = bundle.ood.score(scores.features, scores.raw, pixels) if bundle.ood is not None else None
    flagged = bundle.ood.flagged(ood_scores) if ood_scores is not None else None
    out = []
    for index, gray in enumerate(pixels):
        warnings = input_warnings(gray, metas[index], bundle.intended_use)
        forcing = flag_reasons(gray, metas[index], bundle.intended_use)
        entry = {"warnings": warnings, "ood_score": None, "in_distribution": None if not forcing else False}
        if ood_scores is not None:
            entry["ood_score"], entry["ood_threshold"] = float(ood_scores[index]), float(bundle.ood.threshold)
            entry["in_distribution"] = not flagged[index] and not forcing
        if entry["in_distribution"] is False:
            entry["warnings"] = warnings + [flag_message(bundle.intended_use)]
        out.append(entry)
    return out


def in_distribution(bundle, pixels, scores: Scores, metas=None) -> np.ndarray:
    """Which images ``--adapt-batch`` re-estimates batch-norm statistics on: those not flagged (``metas``: what
    each file says of itself, colour and DICOM tags, as ``predict`` reads it: lateral views, other modalities and
    ages outside the intended use are flagged by them)."""
    checks = batch_checks(bundle, pixels, scores, metas)
    return np.array([c["in_distribution"] is not False for c in checks], dtype=bool)


def _public_intended_use(intended_use: dict) -> dict:
    """The model card without the training data's location (a path on the training machine)."""
    public = dict(intended_use or {})
    if isinstance(public.get("trained_on"), dict):
        public["trained_on"] = {k: v for k, v in public["trained_on"].items() if k != "source"}
    return public


def predict(checkpoint, paths, device: str = "auto", batch_size: int = 32, engine: str = "auto",
            prevalence=None, adapt_batch: bool = False) -> list[Prediction]:
    """Library form of ``pneumonia-cnn predict``: ``paths`` is a list of files, or one file (a ``str`` had been
    read as a list of one-letter files, one error each)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ConfigError(f"batch_size: {batch_size!r} must be a whole number of at least 1")
    paths = [os.fsdecode(paths)] if isinstance(paths, (str, bytes, os.PathLike)) else list(paths)
    return Predictor(checkpoint, device, engine=engine, prevalence=prevalence,
                     adapt_batch=adapt_batch).predict_files(paths, batch_size)
