"""Floor 4: parse flags, call one library function, print. Errors are one line, never a traceback."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .errors import PneumoniaCNNError

log = logging.getLogger("pneumonia_cnn")


def _setup_logging(verbose: bool):
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("matplotlib", "PIL", "urllib3", "httpx", "h5py", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _print_json(payload):
    print(json.dumps(payload, indent=2, default=str))


# ------------------------------------------------------------------ commands
def cmd_train(args):
    from .experiment import resume_and_evaluate, train_and_evaluate
    from .training import make_config
    overrides = {name: getattr(args, name) for name in
                 ("model", "epochs", "batch_size", "lr", "size", "channels", "seed", "device", "amp", "optimizer",
                  "weight_decay", "schedule", "warmup_epochs", "label_smoothing", "class_balance", "ema_decay",
                  "monitor", "early_stopping", "threshold", "intensity", "interpolation", "val_from_train",
                  "cache_dir", "tracker", "tracking_uri", "max_steps_per_epoch", "limit_images", "weights",
                  "workers", "population", "age_range_years")}
    for flag in ("deterministic", "compile", "tta", "calibrate"):
        if getattr(args, flag):
            overrides[flag] = True
    if args.no_ood:
        overrides["ood"] = False
    if args.no_channels_last:
        overrides["channels_last"] = False
    if args.augment:
        overrides["augment"] = json.loads(args.augment)
    overrides["progress"] = not args.no_progress
    if args.resume:
        summary = resume_and_evaluate(args.resume, **{k: v for k, v in overrides.items() if k in ("epochs", "device", "progress")})
    else:
        if not args.data:
            raise PneumoniaCNNError("train needs --data ROOT (a folder in the Kaggle layout) or --resume RUN_DIR")
        config = make_config(args.preset, args.config, data=args.data, out=args.out, **overrides)
        summary = train_and_evaluate(config)
    if summary.get("interrupted"):
        return 130
    if not summary.get("main_process", True):
        return 0  # in data-parallel runs only rank 0 reports
    test = summary.get("test_metrics")
    if test:
        print(f"test accuracy {test['accuracy']:.4f}  sensitivity {test['sensitivity']:.4f}  "
              f"specificity {test['specificity']:.4f}  ROC AUC {test['roc_auc']:.4f}")
    print(f"run folder: {summary['run_dir']}")
    return 0


def cmd_evaluate(args):
    from .evaluation.evaluate import evaluate, format_table
    first = Path(args.checkpoint[0])
    out = args.out or str((first if first.is_dir() else first.parent) / f"{args.split}_metrics.json")
    report = evaluate(args.checkpoint if len(args.checkpoint) > 1 else args.checkpoint[0], args.data, args.split,
                      device=args.device, threshold=args.threshold, bootstrap=args.bootstrap, seed=args.seed,
                      cache_dir=args.cache_dir, out=out, figures=not args.no_figures, progress=not args.no_progress)
    if args.format == "json":
        _print_json({k: v for k, v in report.items() if k != "predictions"})
    else:
        print(format_table(report))
        print(f"written: {out}")
    return 0


def cmd_predict(args):
    from .inference import Predictor
    from .predict_io import collect_paths, format_predictions
    paths, missing = collect_paths(args.paths)
    predictor = Predictor(args.checkpoint, args.device, amp=args.amp, engine=args.engine)
    predictions = predictor.predict_files(paths, args.batch_size, progress=not args.no_progress and len(paths) > 64)
    for entry in missing:
        from .inference import Prediction
        predictions.append(Prediction(entry, error="no such file or folder", model=predictor.model_id))
    print(format_predictions(predictions, args.format))
    failed = [p for p in predictions if p.error]
    for p in failed:
        log.warning("skipped %s: %s", p.path, p.error)
    return 1 if predictions and len(failed) == len(predictions) else 0


def cmd_summary(args):
    from .models import create_model, format_summary
    model = create_model(args.model, in_channels=args.channels, image_size=(args.size, args.size))
    print(format_summary(model, args.channels, (args.size, args.size), args.model))
    return 0


def cmd_models(args):
    from .models import count_parameters, create_model, list_models
    for name, description in list_models().items():
        params = count_parameters(create_model(name))[0]
        print(f"{name:<18}{params:>12,}  {description}")
    return 0


def cmd_show_samples(args):
    from .samples import show_samples
    path = show_samples(args.data, args.split, args.out, args.per_class, args.seed)
    print(f"written: {path}")
    return 0


def cmd_demo(args):
    from .demo import run_demo
    summary = run_demo(args.out, data=args.data, epochs=args.epochs, size=args.size, device=args.device)
    test = summary.get("test_metrics", {})
    print(f"demo finished in {summary['seconds']:.0f}s: test accuracy {test.get('accuracy', float('nan')):.3f}, "
          f"ROC AUC {test.get('roc_auc', float('nan')):.3f}; run folder {summary['run_dir']}")
    return 0


def cmd_info(args):
    from .info import describe_checkpoint
    print(describe_checkpoint(args.checkpoint, as_json=args.format == "json"))
    return 0


# ------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pneumonia-cnn",
        description="Train, evaluate, explain and serve CNNs that detect pneumonia on chest X-rays. "
                    "Research and teaching software, not a medical device.",
        epilog="Start with: pneumonia-cnn demo. Each command has --help.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model on a Kaggle-layout folder")
    p.add_argument("--data", help="ROOT with train/ (and val/, test/) of NORMAL/ and PNEUMONIA/, or a CSV")
    p.add_argument("--out", default="runs/run", help="run folder (checkpoints, history, curves)")
    p.add_argument("--preset", default="tutorial", help="tutorial (the Keras tutorial exactly) or best")
    p.add_argument("--config", help="YAML/TOML/JSON file of config fields (overrides the preset)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from its last checkpoint")
    p.add_argument("--model"), p.add_argument("--epochs", type=int), p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float), p.add_argument("--size", type=int)
    p.add_argument("--channels", type=int, choices=(1, 3)), p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto | cpu | cuda")
    p.add_argument("--amp", help="auto (bf16 on CUDA and on CPUs with bf16 instructions) | off | bf16 | fp16")
    p.add_argument("--optimizer"), p.add_argument("--weight-decay", type=float)
    p.add_argument("--schedule"), p.add_argument("--warmup-epochs", type=float)
    p.add_argument("--label-smoothing", type=float), p.add_argument("--class-balance")
    p.add_argument("--ema-decay", type=float), p.add_argument("--monitor"), p.add_argument("--early-stopping", type=int)
    p.add_argument("--threshold", help="0.5 | youden | sensitivity:0.95 (chosen on val)")
    p.add_argument("--intensity", help="none | equalize | clahe | window")
    p.add_argument("--interpolation", help="bilinear | nearest (Keras' default) | bicubic | area")
    p.add_argument("--augment", help='JSON, e.g. \'{"shear": 0.2, "zoom": 0.2, "flip": true}\'')
    p.add_argument("--val-from-train", type=float, help="carve this fraction of train's patients as val")
    p.add_argument("--cache-dir"), p.add_argument("--workers", type=int)
    p.add_argument("--tracker", help="none | mlflow | tensorboard"), p.add_argument("--tracking-uri")
    p.add_argument("--max-steps-per-epoch", type=int), p.add_argument("--limit-images", type=int)
    p.add_argument("--weights", help="local weights file to start from")
    p.add_argument("--population", help="who the training X-rays come from (for the model card)")
    p.add_argument("--age-range", dest="age_range_years", type=float, nargs=2, metavar=("MIN", "MAX"),
                   help="training population's age range in years (DICOM ages outside it are warned about)")
    p.add_argument("--deterministic", action="store_true"), p.add_argument("--compile", action="store_true")
    p.add_argument("--tta", action="store_true"), p.add_argument("--calibrate", action="store_true")
    p.add_argument("--no-ood", action="store_true"), p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="metrics with 95%% intervals on a labelled split")
    p.add_argument("--checkpoint", required=True, nargs="+", help="best.pt or run folder; several = ensemble")
    p.add_argument("--data", required=True, help="Kaggle-layout ROOT, a split folder, or a CSV of path,label")
    p.add_argument("--split", default="test")
    p.add_argument("--threshold", help="saved (default) | 0.5 | youden | sensitivity:0.95 (chosen on val)")
    p.add_argument("--bootstrap", type=int, default=1000), p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.add_argument("--out", help="JSON path (default: beside the checkpoint)")
    p.add_argument("--device", default="auto"), p.add_argument("--cache-dir")
    p.add_argument("--no-figures", action="store_true"), p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="probabilities for image/DICOM files, folders or globs")
    p.add_argument("checkpoint", nargs="+", help="best.pt or run folder, then PATH... (use -- before paths "
                                                  "when giving several checkpoints)")
    p.add_argument("--paths", nargs="*", default=None, help=argparse.SUPPRESS)
    p.add_argument("--format", choices=("table", "json", "csv"), default="table")
    p.add_argument("--batch-size", type=int, default=32), p.add_argument("--device", default="auto")
    p.add_argument("--engine", choices=("auto", "torch", "onnx"), default="auto",
                   help="auto: ONNX Runtime on CPUs when installed (unless --amp), else torch")
    p.add_argument("--amp", choices=("off", "bf16", "fp16", "auto"), default="off",
                   help="reduced precision on the torch engine: bf16 is 1.7x faster on CPUs with bf16 "
                        "instructions; probabilities move by up to about 0.02")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("summary", help="Keras-style table of a model's layers and parameters")
    p.add_argument("--model", default="seed"), p.add_argument("--size", type=int, default=224)
    p.add_argument("--channels", type=int, default=3)
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("models", help="list the registered models")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("show-samples", help="grid of NORMAL vs PNEUMONIA images")
    p.add_argument("--data", required=True), p.add_argument("--split", default="train")
    p.add_argument("--out", default="samples.png"), p.add_argument("--per-class", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_show_samples)

    p = sub.add_parser("demo", help="the whole pipeline on built-in synthetic X-rays (or --data ROOT)")
    p.add_argument("--out", default="runs/demo"), p.add_argument("--data")
    p.add_argument("--epochs", type=int, default=None), p.add_argument("--size", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("info", help="what a checkpoint is, was trained on, and is for")
    p.add_argument("checkpoint"), p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(func=cmd_info)

    from . import cli_more
    cli_more.add_commands(sub)
    return parser


def _split_predict_args(args):
    """``predict CKPT PATH...``: the first is the checkpoint; ``--`` separates several checkpoints."""
    if args.command != "predict":
        return args
    items = args.checkpoint
    if args.paths:
        args.checkpoint, args.paths = items, args.paths
    elif len(items) < 2:
        raise PneumoniaCNNError("predict needs a checkpoint and at least one file, folder or glob")
    else:
        args.checkpoint, args.paths = [items[0]], items[1:]
    args.checkpoint = args.checkpoint if len(args.checkpoint) > 1 else args.checkpoint[0]
    return args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "predict" and "--" in argv:  # predict A.pt B.pt -- PATHS
        cut = argv.index("--")
        argv = argv[:cut] + ["--paths"] + argv[cut + 1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        args = _split_predict_args(args)
        return int(args.func(args) or 0)
    except PneumoniaCNNError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as error:
        if args.verbose:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
