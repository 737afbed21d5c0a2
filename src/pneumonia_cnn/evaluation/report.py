"""``report``: one self-contained HTML file for a run (pictures embedded as data URIs)."""
from __future__ import annotations

import base64
import html
import json
import logging
from pathlib import Path

from ..builtin import is_builtin
from ..checkpoint import load_checkpoint
from ..data.dataset import load_split
from ..errors import DatasetError, PneumoniaCNNError
from ..fileio import display_path, printable
from ..info import (
    NOT_FITTED,
    _calibration_text,
    _fit_text,
    adaptation_lines,
    checkpoint_card,
    threshold_text,
    trained_on_text,
)
from .evaluate import evaluate
from .staging import Staged, refuse_outputs_in_data
from .stress import stress_test

METRIC_NAMES = {"accuracy": "Accuracy", "balanced_accuracy": "Balanced accuracy", "sensitivity": "Sensitivity (recall)",
                "specificity": "Specificity", "ppv": "PPV (precision)", "npv": "NPV", "f1": "F1", "roc_auc": "ROC AUC",
                "pr_auc": "PR AUC (average precision)", "brier": "Brier score", "log_loss": "Log loss",
                "ece": "Expected calibration error"}

STYLE = """
body{font-family:system-ui,sans-serif;max-width:70rem;margin:2rem auto;color:#1d2733;line-height:1.45}
h1{font-size:1.6rem}h2{border-bottom:1px solid #d5dde6;padding-bottom:.2rem;margin-top:2rem}
table{border-collapse:collapse;margin:.6rem 0}td,th{border:1px solid #d5dde6;padding:.25rem .6rem;text-align:right}
th{background:#f1f5f9}td:first-child,th:first-child{text-align:left}
.figs img{max-width:23rem;margin:.3rem}.figs img.wide{max-width:100%}.note{color:#5a6675}
.warn{background:#fff4d6;border:1px solid #e0b84c;padding:.6rem}
code{background:#f1f5f9;padding:0 .2rem}
"""


def _escape(value) -> str:
    """Text for the page: a file name's bytes that are not UTF-8 as ``\\xff`` (as ``predict`` shows them; the
    page is UTF-8, which has no lone surrogates), controls escaped, then HTML-escaped."""
    return html.escape(printable(value))


def _image(path, wide: bool = False) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    css = ' class="wide"' if wide else ""
    return f'<img{css} src="data:image/png;base64,{data}" alt="{_escape(Path(path).stem)}">'


def _number(value) -> str:
    return "undefined" if value != value else f"{value:.4f}"  # NaN: e.g. NPV with no negative calls


def _metrics_table(metrics: dict, unit: str) -> str:
    rows = "".join(f"<tr><td>{METRIC_NAMES[k]}</td><td>{_number(metrics[k]['value'])}</td>"
                   f"<td>[{_number(metrics[k]['ci95'][0])}, {_number(metrics[k]['ci95'][1])}]</td></tr>"
                   for k in METRIC_NAMES if k in metrics)
    return f"<table><tr><th>metric</th><th>value</th><th>95% CI ({unit} bootstrap)</th></tr>{rows}</table>"


def subgroup_section(result: dict) -> str:
    """``evaluate --by``: one row per metric, one column per group (value and 95% interval), the largest gap."""
    groups, gaps = result["groups"], result["largest_gap"]
    head = "".join(f"<th>{_escape(str(g['value']))}<br>n={g['n_images']} ({g['n_positive']}+/{g['n_negative']}-)"
                   "</th>" for g in groups)
    rows = "".join(
        f"<tr><td>{METRIC_NAMES[k]}</td>" + "".join(
            f"<td>{_number(g['metrics'][k]['value'])} [{_number(g['metrics'][k]['ci95'][0])}, "
            f"{_number(g['metrics'][k]['ci95'][1])}]</td>" for g in groups)
        + (f"<td>{gaps[k]['gap']:.4f} ({_escape(str(gaps[k]['best']))} vs {_escape(str(gaps[k]['worst']))})"
           "</td>" if k in gaps else "<td>-</td>") + "</tr>" for k in METRIC_NAMES)
    return (f"<h3>By {_escape(result['field'])}</h3><table class='subgroups'><tr><th>metric</th>{head}"
            f"<th>largest gap (best vs worst)</th></tr>{rows}</table><p class='note'>Value [95% CI] per group; "
            "groups with one class have no sensitivity, specificity or AUC, and their PPV, NPV or F1 is fixed by the "
            "missing class; those, and (missing), are left out of the gaps.</p>"
            + "".join(f"<p class='note'>{_escape(note)}</p>" for note in result.get("notes", [])))


def _run_lists(data, config: dict) -> dict | None:
    """The train and val lists the run used, derived as training derives them (``training.data.split_lists``:
    ``--val-from-train``, a ``val/`` below ``--min-val-images`` carved from train, ``--limit-images`` drawn with
    the run's seed); None when ``data`` is not the run's data folder."""
    if not config.get("data") or not _same_folder(data, str(config["data"])):
        return None
    from ..training import config_from_dict
    from ..training.data import split_lists
    quiet = logging.getLogger(split_lists.__module__)  # training's warnings were said when it ran
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        train, val = split_lists(config_from_dict(dict(config, data=str(data))))
    finally:
        quiet.setLevel(level)
    return {"train": train, "val": val}


def _same_folder(data, configured: str) -> bool:
    """``data`` is the folder the config names; a relative name (``../shared/data/chest_xray_224``, relative to
    where the run was trained) is the folder whose path ends with it."""
    here, named = Path(data).resolve(), Path(configured)
    if named.is_absolute() or named.resolve() == here:
        return named.resolve() == here
    tail = [part for part in named.parts if part not in ("..", ".")]
    return bool(tail) and list(here.parts[-len(tail):]) == tail


def _split_cells(images) -> str:
    counts = images.counts()
    return ("".join(f"<td>{counts.get(c, 0)}</td>" for c in ("NORMAL", "PNEUMONIA"))
            + f"<td>{len(images)}</td><td>{len(set(images.patients))}</td>")


def _on_disk(data) -> dict:
    found = {}
    for split in ("train", "val", "test"):
        try:
            found[split] = load_split(data, split)
        except (DatasetError, OSError):
            continue
    return found


def _data_summary(data, checkpoint: dict | None = None) -> str:
    """Counts per split, class and patients: the images the run used (``--limit-images``, a val carved from
    train) beside the folders on disk when ``data`` is the run's own; else the folders, said to be so."""
    config = (checkpoint or {}).get("config") or {}
    disk, used, problem = _on_disk(data), None, ""
    try:
        used = _run_lists(data, config)
    except (PneumoniaCNNError, OSError) as error:
        problem = f" What this run used could not be derived from its config ({error})."
    if used is None:
        if not disk:
            return "<p class='note'>data folder not available</p>"
        rows = "".join(f"<tr><td>{split}</td>{_split_cells(images)}</tr>" for split, images in disk.items())
        other = "" if problem or not config.get("data") else \
            f" This run was trained on {_escape(str(config['data']))}, not this folder."
        return ("<table><tr><th>split</th><th>NORMAL</th><th>PNEUMONIA</th><th>images</th><th>patients</th></tr>"
                f"{rows}</table><p class='note'>Folders on disk.{other}{problem}{_recorded(checkpoint)}</p>")
    carved = used["val"] is not None and "train" in disk and set(used["val"].paths) <= set(disk["train"].paths)
    rows = []
    for split in ("train", "val", "test"):
        run = used.get(split, disk.get(split))
        if run is None and split not in disk:
            continue
        cells = _split_cells(run) if run is not None else "<td>-</td>" * 4
        where = disk.get(split)
        shown = "-" if where is None else f"{len(where)} images, {len(set(where.patients))} patients"
        shown += " (not used: val carved from train)" if split == "val" and carved and where is not None else ""
        label = f"{split} (carved from train)" if split == "val" and carved else split
        rows.append(f"<tr><td>{label}</td>{cells}<td>{shown}</td></tr>")
    limit = config.get("limit_images")
    drawn = (f" --limit-images {limit} drew at most {limit} images of train and of val at random (seed "
             f"{config.get('seed', 0)}).") if limit else ""
    return ("<table><tr><th>split</th><th>NORMAL</th><th>PNEUMONIA</th><th>images</th><th>patients</th>"
            "<th>folder on disk</th></tr>" + "".join(rows) + "</table><p class='note'>Used by this run: derived "
            f"from its config as training derives them.{drawn} The test split is evaluated whole."
            f"{_recorded(checkpoint)}</p>")


def _recorded(checkpoint: dict | None) -> str:
    """What the checkpoint itself records of the images it was trained and decided on (readable ones)."""
    checkpoint = checkpoint or {}
    trained = ((checkpoint.get("intended_use") or {}).get("trained_on") or {}).get("images")
    fit = checkpoint.get("decision_fit") if isinstance(checkpoint.get("decision_fit"), dict) else {}
    decided = fit.get("images")
    refit = fit.get("threshold_refit") if isinstance(fit.get("threshold_refit"), dict) else {}
    parts = ([f"{trained} training images"] if trained is not None else []) + \
        ([f"a decision fitted on {decided} {fit.get('split', 'val')} images"] if decided else []) + \
        ([f"its threshold refitted since on {refit['images']} {refit.get('split', 'val')} images"]
         if refit.get("images") else [])  # adapt --labelled, evaluate --threshold --save-as: it named val's alone
    listed = " and ".join([", ".join(parts[:-1]), parts[-1]] if len(parts) > 2 else parts)
    return f" The checkpoint records {listed}." if parts else ""


def _decision_section(card: dict, run_dir: Path | None) -> str:
    """How the threshold and the calibration were chosen, with each method's cross-validated figures."""
    fit = card.get("decision_fitted_on") or {}
    rows = "".join(f"<tr><td>{_escape(method)}</td><td>{v['log_loss']:.4f}</td><td>{v['ece']:.4f}</td></tr>"
                   for method, v in (fit.get("calibration_comparison") or {}).items())
    table = ("<table><tr><th>calibration</th><th>log loss</th><th>ECE</th></tr>" + rows + "</table><p class='note'>"
             "Each method fitted on four fifths of the validation images and scored on the fifth left out "
             "(5-fold).</p>") if rows else ""
    picture = (f"<div class='figs'>{_image(run_dir / 'calibration.png')}</div>"
               if run_dir is not None and (run_dir / "calibration.png").exists() else "")
    return (f"<h2>Decision</h2><p>T{_escape(threshold_text(card))[1:]}; "
            f"{_escape(_calibration_text(card['calibration'], fit, card.get('decision_not_fitted')))}; fitted on "
            f"{_escape(NOT_FITTED if card.get('decision_not_fitted') else _fit_text(fit))}.</p>{table}{picture}")


def _curves_section(checkpoint: dict, run_dir: Path | None) -> str:
    """The run's curves.png, or the same figure drawn from the checkpoint's own history: a checkpoint without its
    run folder (the built-in model, a best.pt copied alone) had no section and no word of why."""
    if run_dir is not None and (run_dir / "curves.png").exists():
        return f"<h2>Training curves</h2><div class='figs'>{_image(run_dir / 'curves.png', wide=True)}</div>"
    history = checkpoint.get("history")
    if not isinstance(history, list) or not history:
        return "<h2>Training curves</h2><p class='note'>None: the checkpoint records no training history.</p>"
    import tempfile

    from ..plots import training_curves
    with tempfile.TemporaryDirectory(prefix="pcnn-report-") as folder:
        training_curves(history, Path(folder) / "curves.png")
        picture = _image(Path(folder) / "curves.png", wide=True)
    return (f"<h2>Training curves</h2><div class='figs'>{picture}</div><p class='note'>Drawn from the checkpoint's "
            "history (no curves.png beside it).</p>")


def _adaptation_section(card: dict) -> str:
    """What ``adapt`` did to the source checkpoint (the report had no word of it); empty for a model never adapted."""
    if not isinstance(card.get("adapted"), dict):
        return ""
    first, *rest = adaptation_lines(card["adapted"])
    return (f"<h2>Adaptation to a new site</h2><p>{_escape(first[0].upper() + first[1:])}.</p><ul>"
            + "".join(f"<li>{_escape(line.strip())}</li>" for line in rest) + "</ul>")


def report_paths(run_dir, split: str, out=None) -> tuple[Path, Path]:
    """Where ``report`` writes its page and the metrics JSON beside it, which the command checks first: OUT and
    OUT-STEM_SPLIT_metrics.json; by default RUN_DIR/report.html, or ./builtin_report.html for the built-in model
    (never into the installed package). The metrics and their figures go under the report's own name: a run's
    test_metrics.json (training's, 200 resamples on its own data) is never rewritten by reading it."""
    if out:
        return Path(out), Path(out).parent / f"{Path(out).stem}_{split}_metrics.json"
    packaged = is_builtin(run_dir)
    folder = Path(".") if packaged else Path(run_dir) if Path(run_dir).is_dir() else Path(run_dir).parent
    prefix = "builtin_" if packaged else ""
    return folder / f"{prefix}report.html", folder / f"{prefix}report_{split}_metrics.json"


def write_report(run_dir, data=None, split="test", out=None, device="auto", bootstrap=1000, cache_dir=None,
                 stress: bool = True, by=None) -> Path:
    checkpoint = load_checkpoint(run_dir, unfinished_run=True)  # a checkpoint, a run folder, or builtin
    checkpoint_path = Path(checkpoint["path"])
    packaged, flag = is_builtin(run_dir), "--out" if out else "the default --out"
    out, metrics = report_paths(run_dir, split, out)
    run_dir = Path(".") if packaged else checkpoint_path.parent  # never write into the installed package
    config = checkpoint.get("config", {})
    data = data or config.get("data")
    if not data or not Path(data).exists():
        raise PneumoniaCNNError(f"{display_path(data or '?')}: data folder not found; pass --data ROOT")
    refuse_outputs_in_data(out, data, (split,), "report", flag, what="the page, its metrics JSON and figures")
    with Staged() as staged:  # the page, the metrics JSON and its pictures: put in place together, at the end
        report = evaluate(checkpoint_path, data, split, device=device, bootstrap=bootstrap, cache_dir=cache_dir,
                          out=metrics, figures=True, by=by, staged=staged)
        document = _document(checkpoint, report, data, split, device, cache_dir, stress, packaged, run_dir, staged)
        staged.text(out, document)
    return out


def _document(checkpoint, report, data, split, device, cache_dir, stress, packaged, run_dir, staged) -> str:
    checkpoint_path, config = Path(checkpoint["path"]), checkpoint.get("config", {})
    card = checkpoint_card(checkpoint)
    sections = [f"<h1>pneumonia-cnn report: {_escape(str(card['run_id']))}</h1>"
                "<p class='warn'><b>Not a medical device.</b> Research and teaching software; never the sole "
                "basis of a clinical decision.</p>",
                _configuration_section(card, config), _decision_section(card, None if packaged else run_dir),
                _adaptation_section(card),
                f"<h2>Data</h2><p>{_escape(str(data))}</p>{_data_summary(data, checkpoint)}"]
    sections.append(_curves_section(checkpoint, None if packaged else run_dir))
    sections += [_metrics_section(report, split), *[subgroup_section(r) for r in report.get("subgroups", [])],
                 _pictures_section(report.get("figures", {}), staged.staged)]
    if stress:
        sections.append(_stress_section(stress_test(checkpoint_path, data, split, device=device, cache_dir=cache_dir)))
    sections += [_ood_section(report, card), _model_card_section(card)]
    return ("<!doctype html><html lang='en'><head><meta charset='utf-8'><title>pneumonia-cnn report "
            f"{_escape(str(card['run_id']))}</title><style>{STYLE}</style></head><body>"
            + "\n".join(sections) + "</body></html>")


def _configuration_section(card: dict, config: dict) -> str:
    rows = "".join(f"<tr><td>{_escape(str(k))}</td><td style='text-align:left'><code>"
                   f"{_escape(json.dumps(v) if not isinstance(v, str) else v)}</code></td></tr>"
                   for k, v in config.items())
    size = card["input"]["size"]
    calibration = _calibration_text(card["calibration"], card.get("decision_fitted_on"),
                                    card.get("decision_not_fitted", False))
    return (f"<h2>Configuration</h2><p>model <b>{card['model']}</b>, {card['parameters'] or 0:,} parameters, "
            f"input {size[0]}×{size[1]}, {card['input']['channels']} channel(s), "
            f"{_escape(threshold_text(card, 'policy: '))}, "
            f"{_escape(calibration)}</p>"
            f"<details><summary>full config</summary><table>{rows}</table></details>")


def _metrics_section(report: dict, split: str) -> str:
    cm = report["metrics"]["confusion_matrix"]
    counts = ", ".join(f"{_escape(k)} {v}" for k, v in report["counts"].items())
    section = (f"<h2>Metrics on {_escape(split)}</h2><p>{report['n_images']} images ({counts}), "
               f"{report['n_patients']} patients, threshold {report['threshold']:.3f}. Confusion matrix: "
               f"TN {cm['tn']}, FP {cm['fp']}, FN {cm['fn']}, TP {cm['tp']}.</p>"
               + _metrics_table(report["metrics"], report["bootstrap"]["unit"])
               + "".join(f"<p class='note'>Note: {_escape(note)}</p>" for note in report.get("notes", [])))
    if "patient_metrics" in report:
        section += ("\n<h3>Per patient</h3><p class='note'>A patient is positive if any image is; the patient's "
                    "score is the highest image probability.</p>"
                    + _metrics_table(report["patient_metrics"], "patient"))
    return section


def _pictures_section(figures: dict, where=Path) -> str:
    """``where``: the file that holds a picture's new content until it is put in place (``Staged.staged``)."""
    pictures = "".join(_image(where(figures[k])) for k in ("roc", "pr", "confusion", "reliability", "histogram")
                       if k in figures)
    section = f"<h2>Pictures</h2><div class='figs'>{pictures}</div>"
    if "mistakes" in figures:
        section += ("<h3>Most confident mistakes (false negatives first)</h3><div class='figs'>"
                    + _image(where(figures["mistakes"]), wide=True) + "</div>")
    return section


def _stress_section(result: dict) -> str:
    """The shifts' scores; a value a split cannot give (one class: no ROC AUC, one recall) is "undefined", and
    stress's notes say why (a one-class split had failed the whole report on formatting None)."""
    def row(shift, r):
        return (f"<tr><td>{shift}</td>" + "".join(f"<td>{'undefined' if r[k] is None else f'{r[k]:.4f}'}</td>"
                                                  for k in ("roc_auc", "sensitivity", "specificity")) + "</tr>")
    rows = "".join(row(r["shift"], r) for r in result["shifts"])
    worst = result["worst_roc_auc"]
    return ("<h2>Robustness to image shifts</h2><table><tr><th>shift</th><th>ROC AUC</th>"
            f"<th>sensitivity</th><th>specificity</th></tr>{row('none', result['baseline'])}{rows}</table>"
            + (f"<p>Worst case: {worst['shift']} (ROC AUC {worst['roc_auc']:.4f}).</p>" if worst else "")
            + "".join(f"<p class='note'>Note: {_escape(note)}</p>" for note in result.get("notes", [])))


def _ood_section(report: dict, card: dict) -> str:
    ood = report.get("ood", {})
    if not ood.get("available"):
        return "<h2>Out-of-distribution flags</h2><p>No out-of-distribution model in this checkpoint.</p>"
    return (f"<h2>Out-of-distribution flags</h2><p>{ood['flagged']} of {report['n_images']} images "
            f"({ood['fraction_flagged']:.1%}) flagged as outside the intended use. {_escape(card['ood_flag'])}</p>")


def _model_card_section(card: dict) -> str:
    use = card["intended_use"] or {}
    return (
        "<h2>Model card</h2>"
        f"<p><b>Intended use:</b> {_escape(use.get('task', 'binary pneumonia screening aid'))}; a research and "
        "teaching aid that flags possible pneumonia for a qualified reader. <b>Not a medical device</b>; not cleared "
        "or approved for diagnosis.</p>"
        f"<p><b>Training population:</b> {_escape(str(use.get('population', 'unknown')))}. "
        f"Trained on {_escape(trained_on_text(use.get('trained_on')))}.</p>"
        "<p><b>Data source and license:</b> Chest X-Ray Images (Pneumonia), Kermany, Zhang, Goldbaum, Mendeley Data v2 "
        "(2018), doi:10.17632/rscbjbr9sj.2, CC BY 4.0 (the Kaggle set by Paul Mooney), unless the config names "
        "another set.</p>"
        "<p><b>Known limits:</b> pediatric-only training data (children aged 1–5) from one hospital; "
        "anterior-posterior views; performance falls on X-rays collected elsewhere (other devices, exposure, "
        "adults) — adults' X-rays can score at chance level. Bacterial and viral pneumonia are not distinguished. "
        "Labels come from the data set's graders, not from a reference standard such as culture or CT. Run "
        "<code>pneumonia-cnn adapt</code> on a new site's images and check the out-of-distribution flag before "
        "use.</p>"
        f"<p><b>Out-of-distribution flag:</b> {_escape(card['ood_flag'])}</p>")
