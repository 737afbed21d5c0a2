"""``info``: a checkpoint's model card in brief: model, input, training data, intended use, flag meaning."""
from __future__ import annotations

import json

from . import builtin
from .calibration import decision_not_fitted
from .checkpoint import build_model, load_checkpoint
from .fileio import printable
from .inference.bundle import ood_detector_of
from .ood import TRAINING_METHODS, flag_message, site_method


def checkpoint_card(checkpoint) -> dict:
    """The card of a loaded checkpoint, or of one loaded here: then its weights are loaded into its model too,
    as predict loads them, so that a checkpoint predict refuses (a weight missing or of another shape) is
    refused here in the same words, not described as if it could be used."""
    ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
    if not isinstance(checkpoint, dict):
        build_model(ckpt)
    config = ckpt.get("config", {})
    ood = ckpt.get("ood")
    return {
        "run_id": ckpt.get("run_id"), "model": ckpt["model"]["name"], "parameters": ckpt.get("parameters"),
        "input": {"channels": 3, **ckpt["preprocessing"]}, "class_names": ckpt.get("class_names"),
        "threshold": ckpt.get("threshold", 0.5), "threshold_policy": ckpt.get("threshold_policy", "0.5"),
        "calibration": ckpt.get("calibration") or {"method": "temperature", "scale": 1 / ckpt.get("temperature", 1.0),
                                                   "bias": 0.0, "prior": None},
        "decision_fitted_on": ckpt.get("decision_fit"), "epoch": ckpt.get("epoch"),
        "decision_not_fitted": decision_not_fitted(ckpt),  # not "an earlier version" with a temperature of 1
        "trained_with": {k: config.get(k) for k in ("preset", "data", "epochs", "batch_size", "lr", "optimizer",
                                                    "schedule", "augment", "class_balance", "seed")},
        "intended_use": ckpt.get("intended_use", {}),
        "adapted": ckpt.get("adaptation"),
        "imported": ckpt.get("imported") if isinstance(ckpt.get("imported"), dict) else None,
        "ood_flag": (f"fitted: {ood_description(ckpt)} as "
                     f"{flag_message(ckpt.get('intended_use'))}"
                     f"; its probability is still given" if ood else "not fitted for this checkpoint"),
    }


def ood_description(ckpt: dict) -> str:
    """The detector's line: its method, naming its references, and the images that set its bound. A detector
    ``adapt`` refitted before it stored the site's wording still stores a training method (``TRAINING_METHODS``:
    "to the training images"); its ``adaptation.ood_fitted_on`` record says its references were the site's."""
    detector = ood_detector_of(ckpt)
    fit = _site_ood_fit(ckpt)
    if fit is not None and detector.method in TRAINING_METHODS:
        try:
            references = f"{int(fit['reference_images'])} of the new site's {_site_total(fit)} images"
        except (KeyError, TypeError, ValueError):  # a record edited by hand: whose images, without counts
            references = "the new site's images"
        detector.method = site_method(references)
    return detector.describe(ood_bound_images(ckpt))


def ood_bound_images(ckpt: dict) -> str:
    """The images whose scores set the detector's flag bound, as ``OODDetector.describe`` names them: the
    validation images, unless ``adapt`` refitted the detector on a site's (``adaptation.ood_fitted_on``; a
    checkpoint without that record is described as before)."""
    fit = _site_ood_fit(ckpt)
    if fit is None:
        decision = ckpt.get("decision_fit") if isinstance(ckpt.get("decision_fit"), dict) else {}
        if decision.get("split") == "val" and decision.get("images") == 0:  # train's detector without them
            return "the training images' out-of-fold scores (no validation images of both classes)"
        return "validation images"
    try:
        bound, total = int(fit["bound_images"]), _site_total(fit)
    except (KeyError, TypeError, ValueError):  # a record edited by hand: what it was fitted on, without counts
        return "the new site's images, refitted there by adapt, not validation images"
    return f"{bound} of the new site's {total} images, drawn at random by adapt, not validation images"


def _site_ood_fit(ckpt: dict) -> dict | None:
    """``adaptation.ood_fitted_on`` when ``adapt`` refitted the detector on a site's images, else None."""
    adaptation = ckpt.get("adaptation")
    fit = adaptation.get("ood_fitted_on") if isinstance(adaptation, dict) else None
    return fit if isinstance(fit, dict) and fit.get("images") == "site" else None


def _site_total(fit: dict) -> int:
    return int(fit["site_images"]) + int(fit.get("labelled_site_images") or 0)


def threshold_text(card: dict, label: str = "") -> str:
    """The threshold and how it was chosen: a probability given as ``--threshold``
    (``decision_fit.threshold_fixed``) was fitted on no images, which its policy alone ("0.4") does not say."""
    fit = card.get("decision_fitted_on")
    fixed = fit.get("threshold_fixed") if isinstance(fit, dict) else None
    how = "fixed by --threshold, not fitted" if fixed is not None else card["threshold_policy"]
    return f"threshold {card['threshold']:.5g} ({label}{how})"


# an imported Keras model's decision: the tutorial's, fitted on no images here (it read "not recorded (a checkpoint
# of an earlier version)")
NOT_FITTED = ("nothing: these weights were saved while training, before its end-of-run steps (calibration, "
              "threshold, out-of-distribution detector); the threshold 0.5 is a placeholder (use the run's best.pt "
              "once the run has finished, or finish it with pneumonia-cnn train --resume RUN)")
IMPORTED_FIT = ("no images: the tutorial's threshold 0.5 and no calibration, as imported (pneumonia-cnn evaluate "
                "--threshold POLICY --calibration platt --save-as fits them on labelled validation images)")


def describe_checkpoint(checkpoint, as_json: bool = False) -> str:
    card = checkpoint_card(checkpoint)
    if as_json:
        return json.dumps(card, indent=2, default=str)
    use = card["intended_use"] or {}
    imported = card.get("imported")
    origin = (f"imported from Keras file {imported.get('file')} (SHA-256 {imported.get('sha256')}), trained elsewhere"
              if imported else f"epoch {card['epoch']}")
    fitted = (IMPORTED_FIT if imported and not card["decision_fitted_on"] else NOT_FITTED
              if card["decision_not_fitted"] else f"{_fit_text(card['decision_fitted_on'])}{_kept_by_adapt(card)}")
    lines = [f"run {card['run_id']}: model {card['model']} ({card['parameters'] or 0:,} parameters), {origin}",
             f"input: {card['input']['size'][0]}x{card['input']['size'][1]}, {card['input']['channels']} channel(s), "
             f"intensity {card['input'].get('intensity', 'none')}, pixels / 255",
             f"classes: {', '.join(card['class_names'] or [])}; {threshold_text(card)}; "
             f"{_calibration_text(card['calibration'], card['decision_fitted_on'], card['decision_not_fitted'])}",
             f"threshold and calibration fitted on: {fitted}",
             "trained with: " + ("the tutorial's recipe, in Keras, elsewhere: not recorded" if imported else
                                 ", ".join(f"{k}={v}" for k, v in card["trained_with"].items() if v not in (None, ""))),
             f"intended use: {use.get('task', 'binary pneumonia screening aid')}",
             f"training population: {use.get('population', 'unknown')}",
             f"trained on: {trained_on_text(use.get('trained_on'))}",
             "not a medical device: for research and education; never the sole basis of a clinical decision",
             f"out-of-distribution flag: {card['ood_flag']}"]
    if isinstance(card["adapted"], dict):
        lines += adaptation_lines(card["adapted"])
    if checkpoint == builtin.NAME:
        lines += builtin_card_lines(builtin.card())
    # each line as a terminal shows it: a path in the config (data=...) may hold an escape sequence or a newline
    return "\n".join(printable(line) for line in lines)


def trained_on_text(record) -> str:
    """The training images in words (``info`` printed the record's dict): "4137 images from DATA/train at 192x192"."""
    if not isinstance(record, dict) or not record:
        return "not recorded"
    rest = dict(record)
    size, images, source = rest.pop("input_size", None), rest.pop("images", None), rest.pop("source", None)
    text = rest.pop("data", None) or f"{'?' if images is None else images} images" + (f" from {source}" if source
                                                                                        else "")
    if isinstance(size, (list, tuple)) and len(size) == 2:
        text += f" at {size[0]}x{size[1]}"
    return text + "".join(f"; {str(key).replace('_', ' ')} {value}" for key, value in rest.items())


def adaptation_lines(adapted: dict) -> list[str]:
    """What ``adapt`` did, in words (``info`` printed the record's dict): the site's images, what was re-estimated,
    fine-tuned and refitted, which decision ``--adapt-batch`` uses, and the verdict on the kept-out images."""
    share, labelled = adapted.get("outside_source_population"), adapted.get("labelled")
    flagged = (f"; the source checkpoint flagged {share:.1%} of them as outside its training population"
               if isinstance(share, (int, float)) else "")
    lines = [f"adapted to a new site: {adapted.get('site_images', '?')} distinct unlabelled image(s) from "
             f"{adapted.get('site_data')} ({adapted.get('left_out_by_input_checks', 0)} left out by the input checks, "
             f"{adapted.get('copies_counted_once', 0)} copies counted once){flagged}",
             f"  AdaBN: {adapted.get('adabn_layers', 0)} batch-norm layer(s) re-estimated on them"]
    if labelled:
        refitted = [name for name, key in (("threshold", "threshold_refitted_on_site"),
                                           ("calibration", "calibration_refitted_on_site")) if adapted.get(key)]
        lines.append(f"  labelled images from {labelled}: {adapted.get('fine_tune_epochs', 0)} fine-tuning epoch(s) "
                     f"chosen by cross-validation; refitted on them: {' and '.join(refitted) or 'nothing'}")
    ood = adapted.get("ood_fitted_on") if isinstance(adapted.get("ood_fitted_on"), dict) else {}
    if ood.get("text"):
        lines.append(f"  out-of-distribution detector refitted on {ood['text']}")
    if adapted.get("adapt_batch_decision"):
        lines.append(f"  --adapt-batch decision: {adapted['adapt_batch_decision']}")
    if adapted.get("verdict"):
        lines.append(f"  verdict on the kept-out labelled images: {adapted['verdict']}")
    return lines


def builtin_card_lines(card: dict) -> list[str]:
    """The packaged model's card: data and license, figures with intervals, flag rates, how to retrain it."""
    if not card:
        return []
    test = card["figures"]["shared_test"]
    shown = ", ".join(f"{k} {test[k]['value']:.3f} [{test[k]['ci95'][0]:.3f}, {test[k]['ci95'][1]:.3f}]"
                      for k in ("accuracy", "sensitivity", "specificity", "roc_auc", "ece"))
    adults = "; ".join(f"{k} {v['flagged']:.1%} of {v['images']}" for k, v in
                       card["figures"].get("adult_xray_dev_flagged", {}).items())
    return [f"built-in model: {card['data']['name']}; {card['data']['attribution']}; license {card['data']['license']}",
            f"on the shared test folder ({test['images']} images, {test['patients']} patients; 95% patient-bootstrap "
            f"intervals): {shown}; flagged out of distribution {test['flagged_out_of_distribution']:.1%}",
            f"adult X-rays flagged as outside the training population: {adults or 'not measured'}",
            f"file SHA-256 {card['sha256']}; retrain with: {card['reproduce']}"]


def _calibration_text(calibration: dict, fit: dict | None = None, not_fitted: bool = False) -> str:
    """With why a requested calibration was not applied (a Platt fit that cannot rank): the config said platt and
    the decision "no calibration" without a reason."""
    if not_fitted:  # weights saved while training: "temperature calibration (logit x 1.000 +0.000)" was made up
        return "no calibration (not fitted yet)"
    text = (f"{calibration['method']} calibration (logit x {calibration['scale']:.3f} {calibration['bias']:+.3f})"
            if calibration["method"] != "none" else "no calibration")
    note = (fit or {}).get("calibration_note") if isinstance(fit, dict) else None
    if note:
        text += f" ({note})"
    if calibration.get("prior") is not None:
        text += f", probabilities stated for a pneumonia rate of {calibration['prior']:.3f}"
    return text


def _kept_by_adapt(card: dict) -> str:
    """An adapted checkpoint whose decision adapt kept: fitted on the source's weights, not these (it read as
    though fitted on the adapted model)."""
    adapted = card.get("adapted") if isinstance(card.get("adapted"), dict) else None
    if not adapted or adapted.get("threshold_refitted_on_site") or adapted.get("calibration_refitted_on_site"):
        return ""
    if adapted.get("labelled"):  # a given probability threshold is kept, and the calibration without --recalibrate
        return ("; with the source checkpoint's weights, before adapt re-estimated and fine-tuned them on the site's "
                "images (kept by adapt --labelled: the threshold is a given probability; --recalibrate refits the "
                "calibration)")
    return ("; with the source checkpoint's weights, before adapt re-estimated their batch-norm statistics on the "
            "site's images (kept, not refitted on these weights: refitting needs --labelled)")


def _fit_text(fit) -> str:
    fit = dict(fit) if isinstance(fit, dict) else {}
    fixed = fit.pop("threshold_fixed", None)  # recorded beside the calibration's images, which it leaves as they were
    text = _fitted_on_text(fit) if fit else "not recorded (a checkpoint of an earlier version)"
    if fixed is not None:
        value = f"{fixed:.5g}" if isinstance(fixed, (int, float)) else repr(fixed)
        text += f"; the threshold fixed since at {value} by --threshold, not fitted"
    return text


def _fitted_on_text(fit: dict) -> str:
    text = (f"{fit.get('images', '?')} {fit.get('split', 'validation')} images, scored by the {fit.get('engine')} "
            f"engine in {fit.get('precision')}{' with test-time flips' if fit.get('tta') else ''}")
    if fit.get("threshold_refit"):  # evaluate --threshold --save-as: the calibration kept, the threshold refitted
        text += f"; the threshold refitted since on {_fit_text(fit['threshold_refit'])}"
    return text
