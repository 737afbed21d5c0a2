"""Deployment: ``predict``, ``explain``, ``serve``, ``api-key``, ``audit``, ``drift``, ``info``, ``adapt``."""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path

from ..errors import PneumoniaCNNError
from ..fileio import display_path
from ..signals import signals_deferred
from .common import (
    NAME,
    PATH,
    PORT,
    Command,
    add_device,
    add_engine,
    add_format,
    add_site_options,
    check_output,
    check_output_folder,
    positive_number,
    print_json,
    whole_number,
)
from .interop import add_scoring_options, check_scoring_options, scoring_predictor
from .outputs import check_replaceable

log = logging.getLogger("pneumonia_cnn")
PIECE_CHARACTERS = 1024  # at most 4 KiB in UTF-8: below the 8 KiB buffer of sys.stdout


def predict_arguments(p):
    p.add_argument("items", nargs="*", type=PATH, metavar="[CHECKPOINT] PATH",
                   help="a checkpoint (best.pt, a run folder or 'builtin'; the built-in model when left out), then "
                        "files, folders or globs (use -- before the paths when giving several checkpoints)")
    p.add_argument("--paths", nargs="*", type=PATH, default=None, help=argparse.SUPPRESS)
    add_format(p, ("table", "json", "csv", "fhir"))
    add_site_options(p)
    p.add_argument("--batch-size", type=whole_number(1), default=32, help="images per forward pass")
    add_device(p), add_engine(p)
    p.add_argument("--amp", choices=("off", "bf16", "fp16", "auto"), default="off",
                   help="reduced precision on the torch engine (faster on CPUs with bf16 instructions); the "
                        "threshold and calibration were fitted in float32, so probabilities move slightly")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_predict(args) -> int:
    from ..inference import Predictor
    from ..predict_io import collect_in_order, format_predictions
    named = collect_in_order(args.paths)
    if not named:
        raise PneumoniaCNNError(f"{' '.join(args.paths)}: no image or DICOM files found")
    paths = [path for path, absent in named if not absent]
    predictor = Predictor(args.checkpoint, args.device, amp=args.amp, engine=args.engine,
                          prevalence=args.prevalence, adapt_batch=args.adapt_batch)
    progress = not args.no_progress and len(paths) > 64
    chunks = in_named_order(predictor.iter_predictions(paths, args.batch_size, progress=progress), named,
                            predictor.model_id)
    if args.format in ("csv", "table"):  # printed as scored: Ctrl-C keeps what was shown, and memory stays flat
        count, failed = stream_rows(chunks, [path for path, _ in named], args.format, progress)
    else:  # one JSON document
        predictions = [p for chunk in chunks for p in chunk]
        print(format_predictions(predictions, args.format, predictor.class_names[1]))
        count, failed = len(predictions), [p for p in predictions if p.error]
    for p in failed:
        log.warning("skipped %s: %s", display_path(p.path), p.error)  # told apart as in the rows
    return 1 if count and len(failed) == count else 0


def in_named_order(chunks, named, model_id: str):
    """The scored chunks with a row for each missing name where it was named (they had all come last, so a join
    by position against the names given went wrong): ``named`` is ``collect_in_order``'s (path, missing)."""
    from ..inference import Prediction
    pending = iter(named)

    def missing_before_next() -> list:
        rows = []
        for path, absent in pending:
            if not absent:  # the scored path the next prediction is of
                break
            rows.append(Prediction(path, error="no such file or folder", model=model_id))
        return rows
    for chunk in chunks:
        yield [row for prediction in chunk for row in (*missing_before_next(), prediction)]
    yield missing_before_next()  # those named after the last file


def stream_rows(chunks, names, fmt: str, progress: bool) -> tuple[int, list]:
    """Print the head, then each chunk's rows as it comes: together, what ``format_predictions`` gives for them
    all (the table's width depends on the ``names`` alone). The number of rows, and the unreadable ones."""
    from ..predict_io import format_head, format_rows, table_width
    width = table_width(names)
    show(format_head(fmt, width), progress)
    count, failed = 0, []
    for chunk in chunks:
        if chunk:
            show(format_rows(chunk, fmt, width), progress)
        count += len(chunk)
        failed += [p for p in chunk if p.error]
    return count, failed


def show(text: str, progress: bool) -> None:
    """Print ``text`` and a newline, then flush, clearing the progress bar (on the same terminal) while writing.
    Ctrl-C waits until the text is written (a SIGINT inside the write had cut the last row short), and the text
    goes in pieces smaller than the stream's buffer: CPython's buffered writer lost the rest of a larger write
    that a signal interrupted while the pipe was full (a row cut at 64 KiB, then the newline)."""
    with signals_deferred(), contextlib.ExitStack() as stack:
        if progress:
            from tqdm import tqdm
            stack.enter_context(tqdm.external_write_mode(file=sys.stdout))
        text += "\n"
        for start in range(0, len(text), PIECE_CHARACTERS):
            sys.stdout.write(text[start:start + PIECE_CHARACTERS])
        sys.stdout.flush()


def explain_arguments(p):
    p.add_argument("items", nargs="*", type=PATH, metavar="[CHECKPOINT] IMAGE",
                   help="a checkpoint (the built-in model when left out), then image files, folders or globs")
    p.add_argument("--paths", nargs="*", type=PATH, default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", required=True, type=PATH, help="folder for the overlays and maps (made by the first "
                                                           "overlay written)")
    p.add_argument("--layer", type=NAME, help="layer name (default: the last convolution)")
    add_device(p)
    add_scoring_options(p, "explain")  # probability and label as predict's; the heat map stays torch's Grad-CAM


def run_explain(args) -> int:
    from ..explanation import explain_each, planned_overlays
    from ..fileio import printable
    from ..predict_io import collect_paths, shown_label, shown_probability
    check_scoring_options(args, "explain")
    paths, missing = collect_paths(args.paths)
    if not paths:
        reason = "no such file or folder" if missing else "no image or DICOM files found"
        raise PneumoniaCNNError(f"{' '.join(args.paths)}: {reason}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise PneumoniaCNNError(f"{args.out}: --out is a file; give a folder for the overlays")
    refuse_overlays_among_images(args.out, args.paths, paths)
    planned_overlays(paths, args.out)  # refused in a second, before the model loads (explain_each checks again)
    predictor = scoring_predictor(args)  # a model that does not load leaves no --out folder made
    check_output_folder(args.out)  # checked, not made: the first overlay makes it
    explained = 0
    with removed_if_left_empty(args.out):  # no image explained (unreadable ones, a full disk): no folder made
        for item in explain_each(predictor, paths, args.out, args.layer):
            if "error" in item:  # on stderr, one line whatever the file is called, as predict's
                log.warning("skipped %s: %s", printable(display_path(item["path"])), item["error"])
                continue
            explained += 1
            # printed as each image is done (Ctrl-C keeps what was shown), names escaped as in predict's table
            shown = shown_probability(item["probability"], item["threshold"])
            print(f"{printable(display_path(item['path']))}: p={shown} {shown_label(item['label'])} -> "
                  f"{printable(display_path(item['overlay']))} (layer {item['layer']})"
                  + "".join(f"\n  warning: {printable(w)}" for w in item["warnings"]), flush=True)
    for item in missing:
        log.warning("skipped %s: no such file or folder", printable(display_path(item)))
    return 0 if explained else 1


@contextlib.contextmanager
def removed_if_left_empty(folder):
    """The folders that do not exist yet (``folder`` and the parents it needs) are removed at the end if they
    are still empty: what the command made and then wrote nothing into."""
    made = [f for f in [Path(folder), *Path(folder).parents] if not f.exists()]
    try:
        yield
    finally:
        for empty in made:  # innermost first; a folder holding anything stays, and so do its parents
            try:
                empty.rmdir()
            except OSError:
                break


def refuse_overlays_among_images(out, arguments, paths) -> None:
    """Overlays written into a folder given to explain (at any depth below it: it is read whole), or beside an
    image it reads, would be read as X-rays by the next predict or explain of that folder. A subfolder of an
    image's folder is allowed: ``explain chest.jpeg --out maps/`` (refusing every folder below an image's made
    an image in /tmp or $HOME rule out every --out there)."""
    place = Path(out).resolve()
    given = [Path(a).resolve() for a in arguments if _is_folder(a)]  # read whole, subfolders included
    among = next((f for f in sorted(given) if place.is_relative_to(f)), None) or next(
        (f for f in sorted({*map(_folder_of, paths)} - {None}) if place == f), None)
    if among is not None:
        raise PneumoniaCNNError(f"{out}: --out is among the images explain reads ({display_path(among)}); give a "
                                f"folder outside it")


def _folder_of(path) -> Path | None:
    try:
        return Path(path).parent.resolve()
    except (OSError, RuntimeError):  # a link loop: the file's own line will say so
        return None


def _is_folder(path) -> bool:
    try:
        return Path(path).is_dir()
    except OSError:  # a name too long for the system: a file, whose line will say so
        return False


def serve_arguments(p):
    p.add_argument("checkpoint", nargs="?", default="builtin", type=PATH,
                   help="best.pt or run folder (default: builtin)")
    p.add_argument("--host", default="127.0.0.1", type=NAME,
                   help="address to bind (loopback by default; any other address needs --api-keys and --audit-log)")
    p.add_argument("--port", type=PORT, default=8000, help="TCP port")
    p.add_argument("--api-keys", metavar="FILE", type=PATH,
                   help="hashed API keys (pneumonia-cnn api-key); requests then need 'Authorization: Bearer KEY'")
    p.add_argument("--audit-log", metavar="FILE", type=PATH, help="SQLite file that every prediction is appended to")
    p.add_argument("--keep-images", metavar="DIR", type=PATH,
                   help="also keep each upload's bytes here, named by SHA-256")
    p.add_argument("--ssl-certfile", type=PATH, help="TLS certificate (PEM)")
    p.add_argument("--ssl-keyfile", type=PATH, help="TLS key")
    p.add_argument("--allowed-hosts", default="", metavar="NAME,...",
                   help="Host header values to answer besides loopback and the bound address (others get 400)")
    p.add_argument("--max-upload-mb", type=float, default=20, help="largest image accepted, cut while it arrives")
    p.add_argument("--max-batch-upload-mb", type=float, default=256, help="largest /predict/batch body")
    p.add_argument("--max-batch-files", type=int, default=256, help="most files in one /predict/batch request")
    p.add_argument("--max-in-flight", type=int, default=64,
                   help="requests with an upload taken in or scored at once (bounds memory); more wait "
                        "--admission-wait, then get 503 with Retry-After")
    p.add_argument("--max-batches-in-flight", type=int, default=2,
                   help="of those, /predict/batch requests (each up to --max-batch-upload-mb)")
    p.add_argument("--admission-wait", type=float, default=10,
                   help="seconds a request waits for one of those places before 503 (0: refused at once)")
    p.add_argument("--body-timeout", type=float, default=30, help="seconds a request body may take to arrive")
    p.add_argument("--idle-timeout", type=positive_number, default=15,
                   help="seconds a connection may stay without sending a whole request head")
    p.add_argument("--max-batch", type=int, default=16, help="largest micro-batch of concurrent requests")
    p.add_argument("--drift-window", type=int, default=500, help="recent images compared with the reference")
    add_site_options(p)
    add_device(p), add_engine(p)


def run_serve(args) -> int:
    from ..inference.predictor import parse_prevalence
    from ..serving.app import run_server
    from ..serving.service import ServeOptions
    options = ServeOptions(device=args.device, engine=args.engine, max_upload_mb=args.max_upload_mb,
                           max_batch_upload_mb=args.max_batch_upload_mb, max_batch_files=args.max_batch_files,
                           max_batch=args.max_batch,
                           max_in_flight=args.max_in_flight, max_batches_in_flight=args.max_batches_in_flight,
                           body_timeout=args.body_timeout, admission_wait=args.admission_wait,
                           prevalence=parse_prevalence(args.prevalence), adapt_batch=args.adapt_batch,
                           api_keys=args.api_keys, audit_log=args.audit_log, keep_images=args.keep_images,
                           drift_window=args.drift_window)
    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        raise PneumoniaCNNError("TLS needs both --ssl-certfile and --ssl-keyfile")
    run_server(args.checkpoint, host=args.host, port=args.port, options=options,
               allowed_hosts=[h.strip() for h in args.allowed_hosts.split(",") if h.strip()],
               ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile, idle_timeout=args.idle_timeout)
    return 0


def api_key_arguments(p):
    p.add_argument("file", type=PATH, help="the key file (created mode 0600 when absent)")
    p.add_argument("--id", required=True, type=NAME, help="who holds the key (it appears in the audit log)")
    p.add_argument("--role", choices=("predict", "admin"), default="predict", help="admin keys may also reload")
    p.add_argument("--revoke", action="store_true", help="remove the key with this id")


def run_api_key(args) -> int:
    from ..serving.auth import add_key, revoke_key
    if args.revoke:
        revoke_key(args.file, args.id, option=None)  # the file is api-key's own argument, not --api-keys
        print(f"revoked {args.id}; send SIGHUP (or POST /admin/reload) to a running server")
        return 0
    key = add_key(args.file, args.id, args.role, option=None)
    print(key)
    log.info("key for %s (%s) added to %s; it is shown only this once", args.id, args.role, args.file)
    return 0


def audit_arguments(p):
    p.add_argument("log", type=PATH, help="the server's --audit-log file")
    p.add_argument("--since", help="from this date/time (UTC; e.g. 2026-05-01, 2026-05-01T08:00) or span (24h, 7d)")
    p.add_argument("--until", help="before this date/time or span")
    add_format(p, ("csv", "json"), "csv")


def run_audit(args) -> int:
    from ..serving.audit import format_audit, read_audit
    print(format_audit(read_audit(args.log, args.since, args.until), args.format), end="")
    return 0


def drift_arguments(p):
    p.add_argument("checkpoint", type=PATH, help="best.pt or run folder (or builtin: named, since the option lists "
                                                 "after it would otherwise take a model's name as one of theirs)")
    p.add_argument("--data", nargs="+", required=True, type=PATH, help="new images: files, folders or globs")
    add_format(p, ("table", "json"))
    add_device(p, "cpu")
    p.add_argument("--fail-on", choices=("warning", "drift"), help="exit 3 when the status is this or worse, or "
                   "unavailable (for a scheduled check); by default the exit status is 0 whatever the status")


def run_drift(args) -> int:
    from ..monitoring import drift_exit_status, drift_of_files, format_drift
    from ..predict_io import collect_paths
    paths, missing = collect_paths(args.data)
    if not paths:
        raise PneumoniaCNNError(f"--data {' '.join(args.data)}: no images found")
    report = drift_of_files(args.checkpoint, paths, args.device)
    report["skipped"] += [{"path": str(m), "error": "no such file or folder"} for m in missing]
    print_json(report) if args.format == "json" else print(format_drift(report))
    return drift_exit_status(report, args.fail_on)


def info_arguments(p):
    p.add_argument("checkpoint", nargs="?", default="builtin", type=PATH,
                   help="best.pt or run folder (default: builtin)")
    add_format(p, ("text", "json"), "text")


def run_info(args) -> int:
    from ..info import describe_checkpoint
    print(describe_checkpoint(args.checkpoint, as_json=args.format == "json"))
    return 0


def adapt_arguments(p):
    p.add_argument("checkpoint", nargs="?", default="builtin", type=PATH,
                   help="best.pt or run folder (default: builtin)")
    p.add_argument("--data", required=True, type=PATH, help="unlabelled images of the new site")
    p.add_argument("--labelled", type=PATH, help="LABELLED_DIR/{NORMAL,PNEUMONIA} from the new site")
    p.add_argument("--out", required=True, type=PATH,
                   help="the adapted checkpoint to write (an existing checkpoint of your own there is replaced; a "
                        "training run's best.pt or last.pt, or any other file, never)")
    add_device(p)
    p.add_argument("--recalibrate", action="store_true",
                   help="refit the calibration on the labelled images (needs --labelled)")
    p.add_argument("--seed", type=whole_number(0), default=0, help="seed of the kept-out split and fine-tuning")
    p.add_argument("--accept-outside-population", action="store_true",
                   help="adapt even when the source flags 90%% or more of the site's images as outside its training "
                        "population (refused by default: the refitted detector would stop flagging them)")


def run_adapt(args) -> int:
    from ..adaptation import adapt, format_adaptation
    from ..checkpoint import check_out_name
    if args.recalibrate and not args.labelled:  # adapt() would refit nothing, unsaid
        raise PneumoniaCNNError("--recalibrate refits the calibration on the labelled images: give --labelled DIR")
    check_output(args.out, args.checkpoint, args.data, args.labelled)
    check_replaceable(args.out, "checkpoint")
    check_out_name(args.out, "adapt")  # a checkpoint as site.onnx had been written
    result = adapt(args.checkpoint, args.data, args.out, labelled=args.labelled, device=args.device,
                   recalibrate=args.recalibrate, seed=args.seed,
                   accept_outside_population=args.accept_outside_population)
    print(format_adaptation(result))
    return 0


COMMANDS = [
    Command("predict", "probabilities for image/DICOM files, folders or globs", predict_arguments, run_predict, (
        "pneumonia-cnn predict runs/best/best.pt scans/ --format csv",
        "pneumonia-cnn predict runs/best scans/ --prevalence estimate --adapt-batch",
        "pneumonia-cnn predict runs/a runs/b -- scans/")),
    Command("explain", "Grad-CAM heat maps over X-rays", explain_arguments, run_explain,
            ("pneumonia-cnn explain runs/best/best.pt scans/xray.jpeg --out maps/",)),
    Command("serve", "HTTP API and web page (FastAPI + uvicorn)", serve_arguments, run_serve, (
        "pneumonia-cnn serve runs/best --port 8000",
        "pneumonia-cnn serve runs/best/best.pt --host 0.0.0.0 --api-keys keys.txt --audit-log audit.sqlite "
        "--ssl-certfile cert.pem --ssl-keyfile key.pem --allowed-hosts xray.hospital.example")),
    Command("api-key", "add (or revoke) an API key for serve; prints the new key once", api_key_arguments,
            run_api_key, ("pneumonia-cnn api-key keys.txt --id ward3",
                          "pneumonia-cnn api-key keys.txt --id ops --role admin")),
    Command("audit", "export serve's audit log (CSV or JSON)", audit_arguments, run_audit,
            ("pneumonia-cnn audit audit.sqlite --since 2026-05-01 --format json",
             "pneumonia-cnn audit audit.sqlite --since 24h")),
    Command("drift", "compare new images' scores with the checkpoint's validation reference (PSI, KS)",
            drift_arguments, run_drift, ("pneumonia-cnn drift runs/best/best.pt --data site/2026-05/",)),
    Command("info", "what a checkpoint is, was trained on, and is for", info_arguments, run_info,
            ("pneumonia-cnn info runs/best/best.pt",)),
    Command("adapt", "adapt a model to a new site: AdaBN on unlabelled images, optional fine-tuning", adapt_arguments,
            run_adapt, ("pneumonia-cnn adapt runs/best --data site/unlabelled --labelled site/labelled "
                        "--out site.pt",)),
]
