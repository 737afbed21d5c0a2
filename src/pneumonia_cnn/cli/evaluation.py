"""Evaluation: ``evaluate``, ``report``, ``compare``, ``stress``."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import PneumoniaCNNError
from ..fileio import display_path
from .common import (
    BOOTSTRAP,
    BOOTSTRAP_HELP,
    NAME,
    PATH,
    Command,
    add_cache_dir,
    add_device,
    add_engine,
    add_format,
    add_site_options,
    check_output,
    print_json,
    whole_number,
)
from .outputs import (
    check_replaceable,
    checkpoint_file,
    refuse_missing_checkpoints,
    refuse_repeated_checkpoints,
    report_page_of,
)


def evaluate_arguments(p):
    p.add_argument("--checkpoint", nargs="+", type=PATH, default=["builtin"],
                   help="best.pt or run folder; several = ensemble (default: the built-in model)")
    p.add_argument("--data", required=True, type=PATH, help="Kaggle-layout ROOT, a split folder, or a CSV of "
                                                            "path,label")
    p.add_argument("--split", help="split folder under ROOT to evaluate (default test; a CSV has none)")
    p.add_argument("--threshold", help="saved (default), or a policy refitted on --val-split for this evaluation, "
                                       "on the stored calibration: a probability, youden, sensitivity:X, "
                                       "specificity:X")
    p.add_argument("--calibration", choices=("platt", "temperature", "none"),
                   help="refit the calibration (and then the threshold) on --val-split for this evaluation")
    p.add_argument("--val-split", default="val", help="split the threshold/calibration are refitted on")
    p.add_argument("--save-as", type=PATH, help="write the refitted checkpoint here (the checkpoint read is never "
                                                "changed; an existing checkpoint of your own is replaced, a run's "
                                                "best.pt or last.pt never)")
    add_site_options(p)
    p.add_argument("--bootstrap", type=BOOTSTRAP, default=1000,
                   help=f"bootstrap resamples for the 95%% intervals ({BOOTSTRAP_HELP})")
    p.add_argument("--seed", type=whole_number(0), default=0, help="bootstrap seed")
    add_format(p)
    p.add_argument("--out", type=PATH, help="JSON path (default: beside the checkpoint; ./builtin_SPLIT_metrics.json "
                                            "for the built-in model); an existing file there must be an earlier "
                                            "evaluate's")
    add_device(p), add_engine(p), add_cache_dir(p)
    p.add_argument("--no-figures", action="store_true", help="skip the ROC/PR/reliability pictures")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_by(p)


def add_by(p):
    p.add_argument("--by", action="append", metavar="FIELD", type=NAME,
                   help="metrics per subgroup (repeatable): a DICOM attribute (PatientSex, ViewPosition, Manufacturer, "
                        "InstitutionName...), AgeBand (from PatientAge or a CSV age column), or a CSV column")


def keep_other_metrics(out: Path, data, split: str, hint: str = "give --out", checkpoints=(), changes=()) -> None:
    """The default --out (RUN/test_metrics.json) may hold what training measured on its own test split, and a
    report's metrics JSON what its page shows: metrics of another data set or split, of other checkpoints
    (last.pt, an ensemble, another run's best.pt) or of a decision changed by ``changes`` (--threshold,
    --calibration, --prevalence, --adapt-batch) never replace them unasked."""
    try:
        previous = json.loads(out.read_text(encoding="utf-8"))
        earlier = (Path(previous["data"]).resolve(), previous["split"])
        recorded = [str(path) for path in previous.get("checkpoint") or ()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return  # none there, or not a report: written as before
    if earlier != (Path(data).resolve(), split):
        raise PneumoniaCNNError(f"{out}: holds the metrics of {previous['data']} ({previous['split']} split); these "
                                f"of {data} ({split}) would replace them: {hint}")
    earlier_models = [Path(path).name for path in recorded]
    models = [checkpoint_file_name(checkpoint) for checkpoint in checkpoints]
    if earlier_models and models == earlier_models and other_files(recorded, checkpoints):  # runs/f vs runs/g
        earlier_models, models = recorded, [str(checkpoint_file(str(c)) or c) for c in checkpoints]
    if earlier_models and (models != earlier_models or changes):
        these = ", ".join(models) + (f" with {', '.join(changes)}" if changes else "")
        raise PneumoniaCNNError(f"{out}: holds the metrics of {', '.join(earlier_models)} with its saved decision; "
                                f"these of {these} would replace them: {hint}")


def other_files(recorded, checkpoints) -> bool:
    """Whether a checkpoint the metrics record (a path, as it was given) that is here is another file than the
    checkpoint argument in its place loads (of the same name: runs/f/best.pt and runs/g/best.pt). A recorded
    path not found from here (given relative to another folder, a run moved since) is judged by its name."""
    for earlier, checkpoint in zip(recorded, checkpoints):
        found = checkpoint_file(str(checkpoint))
        try:
            if found is not None and Path(earlier).is_file() and not os.path.samefile(earlier, found):
                return True
        except OSError:
            continue
    return False


def checkpoint_file_name(checkpoint: str) -> str:
    """The file a checkpoint argument names: a run folder's best.pt, the built-in model's own file."""
    if checkpoint == "builtin":
        from ..builtin import checkpoint_path
        return Path(checkpoint_path()).name
    return "best.pt" if Path(checkpoint).is_dir() else Path(checkpoint).name


def decision_changes(args) -> list[str]:
    """The options that make an evaluation's metrics other than those of the checkpoints' saved decision."""
    given = (("--threshold", args.threshold is not None and str(args.threshold) != "saved"),
             ("--calibration", args.calibration is not None), ("--prevalence", args.prevalence is not None),
             ("--adapt-batch", bool(args.adapt_batch)))
    return [flag for flag, used in given if used]


def split_read(args, default: str = "test") -> str:
    """``--split``, or ``default``; refused with a CSV, which has no splits (ignored, while the outputs said it)."""
    if args.data and Path(args.data).suffix.lower() == ".csv" and args.split is not None:
        raise PneumoniaCNNError(f"{display_path(args.data)}: --split {args.split} names a split folder, and a CSV has "
                                f"none (every row it lists is evaluated); leave --split out")
    return default if args.split is None else args.split


def run_evaluate(args) -> int:
    from ..evaluation.evaluate import evaluate, format_table, refuse_refit_without_val
    from ..evaluation.staging import refuse_outputs_in_data
    if not Path(args.data).exists():  # said before any check of where the metrics would go
        raise PneumoniaCNNError(f"{args.data}: folder not found")
    args.split = split_read(args)
    refuse_refit_without_val(args.data, args.val_split, args.threshold, args.calibration)  # before where --out goes
    refuse_missing_checkpoints(args.checkpoint)
    refuse_repeated_checkpoints(args.checkpoint)
    first = Path(args.checkpoint[0])
    beside = Path(".") if args.checkpoint[0] == "builtin" else first if first.is_dir() else first.parent
    default = beside / f"{'builtin_' if args.checkpoint[0] == 'builtin' else ''}{args.split}_metrics.json"
    out = args.out or str(default)
    check_output(out, args.checkpoint, args.data)
    refuse_outputs_in_data(out, args.data, (args.split, args.val_split), flag="--out" if args.out else
                           "the default --out")
    check_output(args.save_as, args.checkpoint, args.data, flag="--save-as")  # a model, before any metrics file
    check_replaceable(args.save_as, "checkpoint", "--save-as")
    own = not args.out or Path(out).resolve() == default.resolve()  # RUN/test_metrics.json beside its own model
    page = None if own else report_page_of(out)  # a report's metrics JSON: the page shows them
    if not own:
        check_replaceable(out, "metrics")
    if own or page:
        hint = "give --out" if not args.out else "give another --out" + (f" ({page} shows them)" if page else "")
        keep_other_metrics(Path(out), args.data, args.split, hint, args.checkpoint, decision_changes(args))
    refit = (args.threshold is not None and str(args.threshold) != "saved") or args.calibration is not None
    if args.save_as and not refit:  # there is no refitted decision to write (--threshold saved keeps the stored one)
        raise PneumoniaCNNError("--save-as writes the decision refitted by --threshold or --calibration: give one")
    if args.save_as and Path(args.save_as).resolve() == Path(out).resolve():  # the report would replace the model
        raise PneumoniaCNNError(f"{args.save_as}: --save-as and --out name the same file; give each its own")
    if args.save_as:  # a checkpoint as m.onnx had been written
        from ..checkpoint import check_out_name
        check_out_name(args.save_as, "--save-as", "--save-as")
    report = evaluate(args.checkpoint if len(args.checkpoint) > 1 else args.checkpoint[0], args.data, args.split,
                      device=args.device, threshold=args.threshold, calibration=args.calibration,
                      save_as=args.save_as, val_split=args.val_split, prevalence=args.prevalence,
                      adapt_batch=args.adapt_batch, engine=args.engine, bootstrap=args.bootstrap, seed=args.seed,
                      cache_dir=args.cache_dir, out=out, figures=not args.no_figures, progress=not args.no_progress,
                      by=args.by)
    if args.format == "json":
        print_json({k: v for k, v in report.items() if k != "predictions"})
    else:
        print(format_table(report))
        print(f"written: {display_path(out)}")
    return 0


def report_arguments(p):
    p.add_argument("run_dir", type=PATH, help="run folder (or its best.pt)")
    p.add_argument("--data", type=PATH, help="data root (default: the run's)")
    p.add_argument("--split", default="test", help="split to report on")
    p.add_argument("--out", type=PATH, help="HTML path (default: RUN_DIR/report.html); an existing file there must "
                                            "be an earlier report")
    p.add_argument("--bootstrap", type=BOOTSTRAP, default=1000, help=f"bootstrap resamples ({BOOTSTRAP_HELP})")
    add_device(p), add_cache_dir(p)
    p.add_argument("--no-stress", action="store_true", help="skip the robustness table")
    add_by(p)


def run_report(args) -> int:
    from ..evaluation.report import report_paths, write_report
    check_output(args.out, args.run_dir, args.data)
    out, metrics = report_paths(args.run_dir, args.split, args.out)  # the metrics JSON is written beside the page
    flag = "--out" if args.out else "the default --out"
    check_replaceable(str(out), "report", flag)
    check_replaceable(str(metrics), "metrics", flag)
    path = write_report(args.run_dir, data=args.data, split=args.split, out=args.out, device=args.device,
                        bootstrap=args.bootstrap, cache_dir=args.cache_dir, stress=not args.no_stress, by=args.by)
    print(f"written: {display_path(path)}")
    return 0


def compare_arguments(p):
    p.add_argument("runs", nargs="+", type=PATH, help="run folders or checkpoints")
    p.add_argument("--data", required=True, type=PATH, help="data root")
    p.add_argument("--split", help="split folder under ROOT (default test; a CSV has none)")
    add_format(p), add_device(p), add_cache_dir(p)
    p.add_argument("--bootstrap", type=BOOTSTRAP, default=1000, help=f"bootstrap resamples ({BOOTSTRAP_HELP})")


def run_compare(args) -> int:
    from ..evaluation.compare import compare_runs, format_comparison
    if len(args.runs) < 2:  # nothing to compare it with: it printed one column and no test, exit 0
        raise PneumoniaCNNError(f"compare needs two or more runs, one was given ({args.runs[0]}); one model's "
                                f"metrics: pneumonia-cnn evaluate --checkpoint {args.runs[0]} --data ...")
    refuse_repeated_checkpoints(args.runs, "compare")
    args.split = split_read(args)
    result = compare_runs(args.runs, data=args.data, split=args.split, device=args.device, cache_dir=args.cache_dir,
                          bootstrap=args.bootstrap)
    if args.format == "json":
        print_json(result)
    else:
        print(format_comparison(result))
    return 0


def stress_arguments(p):
    p.add_argument("checkpoint", nargs="?", default="builtin", type=PATH,
                   help="best.pt or run folder (default: builtin)")
    p.add_argument("--data", required=True, type=PATH, help="data root")
    p.add_argument("--split", help="split folder under ROOT (default test; a CSV has none)")
    add_format(p), add_device(p), add_cache_dir(p)
    p.add_argument("--out", type=PATH, help="JSON path (an existing file there must be an earlier stress's)")


def run_stress(args) -> int:
    from ..evaluation.staging import refuse_outputs_in_data
    from ..evaluation.stress import format_stress, stress_test
    refuse_missing_checkpoints([args.checkpoint])
    args.split = split_read(args)
    check_output(args.out, args.checkpoint, args.data)
    refuse_outputs_in_data(args.out, args.data, (args.split,), "stress", what="its JSON")
    check_replaceable(args.out, "stress")
    result = stress_test(args.checkpoint, args.data, args.split, device=args.device, cache_dir=args.cache_dir,
                         out=args.out)
    if args.format == "json":
        print_json(result)
    else:
        print(format_stress(result))
        if args.out:  # as evaluate says where its JSON went
            print(f"written: {display_path(args.out)}")
    return 0


COMMANDS = [
    Command("evaluate", "metrics with 95% intervals on a labelled split", evaluate_arguments, run_evaluate, (
        "pneumonia-cnn evaluate --checkpoint runs/best --data chest_xray --split test",
        "pneumonia-cnn evaluate --checkpoint runs/best --data chest_xray --threshold specificity:0.9 "
        "--save-as runs/best/spec90.pt",
        "pneumonia-cnn evaluate --checkpoint runs/a runs/b --data chest_xray --format json",
        "pneumonia-cnn evaluate --checkpoint runs/best --data site.csv --by sex --by AgeBand",
        "pneumonia-cnn evaluate --checkpoint runs/best --data dicom_root --by PatientSex --by ViewPosition")),
    Command("report", "one self-contained HTML report of a run", report_arguments, run_report,
            ("pneumonia-cnn report runs/best",)),
    Command("compare", "side-by-side metrics and a DeLong test of AUC differences", compare_arguments, run_compare,
            ("pneumonia-cnn compare runs/tutorial runs/best --data chest_xray",)),
    Command("stress", "scores under a fixed, seeded panel of image shifts", stress_arguments, run_stress,
            ("pneumonia-cnn stress runs/best --data chest_xray",)),
]
