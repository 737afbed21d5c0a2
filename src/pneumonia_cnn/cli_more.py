"""Sub-commands beyond the foundation: export, explain, import-keras, serve, report, compare, stress, adapt."""
from __future__ import annotations

import json


def cmd_export(args):
    from .interop.export import export_model
    out = export_model(args.checkpoint, args.format, args.out)
    print(f"written: {out}")
    return 0


def cmd_explain(args):
    from .explanation import explain
    from .inference import Predictor
    from .predict_io import collect_paths
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


def cmd_import_keras(args):
    from .interop.keras_import import import_keras
    size = None
    if args.size:
        parts = [int(p) for p in args.size.lower().split("x")]
        size = (parts[0], parts[-1])
    _, payload = import_keras(args.model, args.out, size)
    height, width = payload["preprocessing"]["size"]
    print(f"imported {args.model}: seed model, input {height}x{width}x{payload['preprocessing']['channels']}, "
          f"{payload['parameters']:,} parameters -> {args.out}")
    return 0


def cmd_serve(args):
    from .serving.app import run_server
    run_server(args.checkpoint, host=args.host, port=args.port, max_upload_mb=args.max_upload_mb,
               device=args.device, max_batch=args.max_batch, engine=args.engine)
    return 0


def cmd_report(args):
    from .evaluation.report import write_report
    path = write_report(args.run_dir, data=args.data, split=args.split, out=args.out, device=args.device,
                        bootstrap=args.bootstrap, cache_dir=args.cache_dir, stress=not args.no_stress)
    print(f"written: {path}")
    return 0


def cmd_compare(args):
    from .evaluation.compare import compare_runs, format_comparison
    result = compare_runs(args.runs, data=args.data, split=args.split, device=args.device, cache_dir=args.cache_dir,
                          bootstrap=args.bootstrap)
    print(json.dumps(result, indent=2, default=str) if args.format == "json" else format_comparison(result))
    return 0


def cmd_stress(args):
    from .evaluation.stress import format_stress, stress_test
    result = stress_test(args.checkpoint, args.data, args.split, device=args.device, cache_dir=args.cache_dir,
                         out=args.out)
    print(json.dumps(result, indent=2) if args.format == "json" else format_stress(result))
    return 0


def cmd_adapt(args):
    from .adaptation import adapt, format_adaptation
    result = adapt(args.checkpoint, args.data, args.out, labelled=args.labelled, device=args.device,
                   recalibrate=args.recalibrate, seed=args.seed)
    print(format_adaptation(result))
    return 0


def add_commands(sub):
    p = sub.add_parser("export", help="export to ONNX or TorchScript with metadata")
    p.add_argument("checkpoint"), p.add_argument("--format", choices=("onnx", "torchscript"), default="onnx")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("explain", help="Grad-CAM heat maps over X-rays")
    p.add_argument("checkpoint"), p.add_argument("images", nargs="+")
    p.add_argument("--out", required=True), p.add_argument("--layer", help="layer name (default: last conv)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("import-keras", help="import the tutorial's trained Keras model (.h5, .keras, .weights.h5)")
    p.add_argument("model"), p.add_argument("--out", required=True)
    p.add_argument("--size", help="input size for weights-only files: 224 or HxW (e.g. 96x80)")
    p.set_defaults(func=cmd_import_keras)

    p = sub.add_parser("serve", help="HTTP API and web page (FastAPI + uvicorn)")
    p.add_argument("checkpoint"), p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000), p.add_argument("--max-upload-mb", type=float, default=20)
    p.add_argument("--max-batch", type=int, default=16), p.add_argument("--device", default="auto")
    p.add_argument("--engine", choices=("auto", "torch", "onnx"), default="auto")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("report", help="one self-contained HTML report of a run")
    p.add_argument("run_dir"), p.add_argument("--data", help="data root (default: the run's)")
    p.add_argument("--split", default="test"), p.add_argument("--out")
    p.add_argument("--bootstrap", type=int, default=1000), p.add_argument("--device", default="auto")
    p.add_argument("--cache-dir"), p.add_argument("--no-stress", action="store_true")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("compare", help="side-by-side metrics and a DeLong test of AUC differences")
    p.add_argument("runs", nargs="+"), p.add_argument("--data", required=True), p.add_argument("--split", default="test")
    p.add_argument("--format", choices=("table", "json"), default="table"), p.add_argument("--device", default="auto")
    p.add_argument("--cache-dir"), p.add_argument("--bootstrap", type=int, default=1000)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("stress", help="scores under a fixed, seeded panel of image shifts")
    p.add_argument("checkpoint"), p.add_argument("--data", required=True), p.add_argument("--split", default="test")
    p.add_argument("--format", choices=("table", "json"), default="table"), p.add_argument("--device", default="auto")
    p.add_argument("--cache-dir"), p.add_argument("--out", help="JSON path")
    p.set_defaults(func=cmd_stress)

    p = sub.add_parser("adapt", help="adapt a model to a new site: AdaBN on unlabelled images, optional fine-tuning")
    p.add_argument("checkpoint"), p.add_argument("--data", required=True, help="unlabelled images of the new site")
    p.add_argument("--labelled", help="LABELLED_DIR/{NORMAL,PNEUMONIA} from the new site")
    p.add_argument("--out", required=True), p.add_argument("--device", default="auto")
    p.add_argument("--recalibrate", action="store_true", help="refit the temperature on the labelled images")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_adapt)
    return sub
