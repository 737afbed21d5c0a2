"""Deployment: ``predict``, ``explain``, ``serve``, ``info``, ``adapt``."""
from __future__ import annotations

import argparse
import logging

from .common import Command, add_device, add_engine, add_format, add_site_options

log = logging.getLogger("pneumonia_cnn")


def predict_arguments(p):
    p.add_argument("checkpoint", nargs="+", help="best.pt or run folder, then PATH... (use -- before paths "
                                                  "when giving several checkpoints)")
    p.add_argument("--paths", nargs="*", default=None, help=argparse.SUPPRESS)
    add_format(p, ("table", "json", "csv", "fhir"))
    add_site_options(p)
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    add_device(p), add_engine(p)
    p.add_argument("--amp", choices=("off", "bf16", "fp16", "auto"), default="off",
                   help="reduced precision on the torch engine (faster on CPUs with bf16 instructions); the "
                        "threshold and calibration were fitted in float32, so probabilities move slightly")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_predict(args) -> int:
    from ..inference import Prediction, Predictor
    from ..predict_io import collect_paths, format_predictions
    paths, missing = collect_paths(args.paths)
    predictor = Predictor(args.checkpoint, args.device, amp=args.amp, engine=args.engine,
                          prevalence=args.prevalence, adapt_batch=args.adapt_batch)
    predictions = predictor.predict_files(paths, args.batch_size, progress=not args.no_progress and len(paths) > 64)
    predictions += [Prediction(entry, error="no such file or folder", model=predictor.model_id) for entry in missing]
    print(format_predictions(predictions, args.format))
    failed = [p for p in predictions if p.error]
    for p in failed:
        log.warning("skipped %s: %s", p.path, p.error)
    return 1 if predictions and len(failed) == len(predictions) else 0


def explain_arguments(p):
    p.add_argument("checkpoint", help="best.pt or run folder"), p.add_argument("images", nargs="+", help="files")
    p.add_argument("--out", required=True, help="folder for the overlays and maps")
    p.add_argument("--layer", help="layer name (default: the last convolution)")
    add_device(p)


def run_explain(args) -> int:
    from ..explanation import explain
    from ..inference import Predictor
    from ..predict_io import collect_paths
    paths, missing = collect_paths(args.images)
    results = explain(Predictor(args.checkpoint, args.device), paths, args.out, args.layer)
    for item in results:
        if "error" in item:
            print(f"skipped {item['path']}: {item['error']}")
        else:
            print(f"{item['path']}: p={item['probability']:.4f} {item['label']} -> {item['overlay']} "
                  f"(layer {item['layer']})")
    for item in missing:
        print(f"skipped {item}: no such file or folder")
    return 0 if any("error" not in r for r in results) else 1


def serve_arguments(p):
    p.add_argument("checkpoint", help="best.pt or run folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (loopback by default)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--max-upload-mb", type=float, default=20, help="largest accepted upload")
    p.add_argument("--max-batch", type=int, default=16, help="largest micro-batch of concurrent requests")
    add_device(p), add_engine(p)


def run_serve(args) -> int:
    from ..serving.app import run_server
    run_server(args.checkpoint, host=args.host, port=args.port, max_upload_mb=args.max_upload_mb,
               device=args.device, max_batch=args.max_batch, engine=args.engine)
    return 0


def info_arguments(p):
    p.add_argument("checkpoint", help="best.pt or run folder")
    add_format(p, ("text", "json"), "text")


def run_info(args) -> int:
    from ..info import describe_checkpoint
    print(describe_checkpoint(args.checkpoint, as_json=args.format == "json"))
    return 0


def adapt_arguments(p):
    p.add_argument("checkpoint", help="best.pt or run folder")
    p.add_argument("--data", required=True, help="unlabelled images of the new site")
    p.add_argument("--labelled", help="LABELLED_DIR/{NORMAL,PNEUMONIA} from the new site")
    p.add_argument("--out", required=True, help="the adapted checkpoint to write")
    add_device(p)
    p.add_argument("--recalibrate", action="store_true", help="refit the calibration on the labelled images")
    p.add_argument("--seed", type=int, default=0, help="seed of the kept-out split and fine-tuning")


def run_adapt(args) -> int:
    from ..adaptation import adapt, format_adaptation
    result = adapt(args.checkpoint, args.data, args.out, labelled=args.labelled, device=args.device,
                   recalibrate=args.recalibrate, seed=args.seed)
    print(format_adaptation(result))
    return 0


COMMANDS = [
    Command("predict", "probabilities for image/DICOM files, folders or globs", predict_arguments, run_predict, (
        "pneumonia-cnn predict runs/best/best.pt scans/ --format csv",
        "pneumonia-cnn predict runs/best scans/ --prevalence estimate --adapt-batch",
        "pneumonia-cnn predict runs/a runs/b -- scans/")),
    Command("explain", "Grad-CAM heat maps over X-rays", explain_arguments, run_explain,
            ("pneumonia-cnn explain runs/best/best.pt xray.jpeg --out maps/",)),
    Command("serve", "HTTP API and web page (FastAPI + uvicorn)", serve_arguments, run_serve,
            ("pneumonia-cnn serve runs/best --port 8000",)),
    Command("info", "what a checkpoint is, was trained on, and is for", info_arguments, run_info,
            ("pneumonia-cnn info runs/best/best.pt",)),
    Command("adapt", "adapt a model to a new site: AdaBN on unlabelled images, optional fine-tuning", adapt_arguments,
            run_adapt, ("pneumonia-cnn adapt runs/best --data site/unlabelled --labelled site/labelled "
                        "--out site.pt",)),
]
