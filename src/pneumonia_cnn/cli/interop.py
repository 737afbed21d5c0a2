"""Interoperability: ``export`` (ONNX, TorchScript), ``import-keras``, and the hospital side: ``pacs``
(DICOMweb) and ``listen`` (DICOM C-STORE node)."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re

from ..errors import PneumoniaCNNError
from ..fileio import display_path
from .common import PATH, PORT, Command, add_device, add_engine, check_output, positive_number, whole_number
from .outputs import check_replaceable, refuse_builtin_folder

log = logging.getLogger("pneumonia_cnn")


def export_arguments(p):
    p.add_argument("checkpoint", nargs="?", default="builtin", type=PATH,
                   help="best.pt or run folder (default: builtin)")
    p.add_argument("--format", choices=("onnx", "torchscript", "onnx-int8"), default="onnx",
                   help="file format; onnx-int8: the served graph quantised to int8, calibrated on --data's val "
                        "split (the checkpoint's own), also kept for --engine onnx-int8 and openvino-int8")
    p.add_argument("--out", required=True, type=PATH, help="file to write")
    p.add_argument("--data", type=PATH, help="onnx-int8: ROOT whose val/ holds the checkpoint's validation images")


def run_export(args) -> int:
    if args.data and args.format != "onnx-int8":
        raise PneumoniaCNNError(f"--data {args.data}: used only by --format onnx-int8 (its calibration images); "
                                f"--format {args.format} takes none")
    check_output(args.out, args.checkpoint, args.data)
    check_export_out(args.out, args.format)
    if args.format == "onnx-int8":
        from ..interop.export import export_int8_model
        if not args.data:
            raise PneumoniaCNNError("export --format onnx-int8 needs --data ROOT (the run's validation images)")
        summary = export_int8_model(args.checkpoint, args.data, args.out)
        kept = (f"kept for --engine onnx-int8 and openvino-int8 in {summary['cached']}" if summary["cache_replaced"]
                else f"not cached: {summary['cached']} keeps its graph calibrated on more images")
        print(f"written: {display_path(summary['out'])} (int8, calibrated on {summary['calibration_images']} "
              f"validation images; {kept})")
        return 0
    from ..interop.export import export_model
    print(f"written: {display_path(export_model(args.checkpoint, args.format, args.out))}")
    return 0


# what each format's --out ends in: a name of another kind (victim.jpeg, a TorchScript zip as model.onnx) is
# refused, as is an existing file that does not hold the format (another run's checkpoint as model.pt)
EXPORT_SUFFIXES = {"onnx": (".onnx",), "onnx-int8": (".onnx",), "torchscript": (".pt", ".pth", ".ts", ".torchscript")}


def check_export_out(out, fmt: str) -> None:
    """Before any work: ``out`` named for ``fmt``, and, when it exists, a file of that format (replaced by the
    export, never something else)."""
    import os
    from pathlib import Path
    suffixes = EXPORT_SUFFIXES[fmt]
    refuse_builtin_folder(out)
    if Path(out).suffix.lower() not in suffixes:
        raise PneumoniaCNNError(f"{out}: --format {fmt} writes a file ending in {' or '.join(suffixes)}; give "
                                f"--out such a name")
    if os.path.isfile(out) and os.path.getsize(out) and not _holds_format(out, fmt):  # empty: mktemp's, say
        kind = "an ONNX model" if fmt.startswith("onnx") else "a TorchScript model"
        raise PneumoniaCNNError(f"{out}: exists and is not {kind} (the export would replace it); choose another "
                                f"--out, or remove it")


def _holds_format(path, fmt: str) -> bool:
    """ONNX: a model with a graph (protobuf parses much garbage); TorchScript: a zip holding code (a checkpoint
    saved by torch.save is a zip too, without it)."""
    import zipfile
    if fmt == "torchscript":
        try:
            with zipfile.ZipFile(path) as archive:
                return any("/code/" in name for name in archive.namelist())
        except (OSError, zipfile.BadZipFile):
            return False
    import onnx
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # protobuf's DecodeError, or an unreadable file
        return False
    return proto.ir_version > 0 and len(proto.graph.node) > 0


def import_keras_arguments(p):
    p.add_argument("model", type=PATH, help=".h5, .keras or .weights.h5 file of the tutorial's model")
    p.add_argument("--out", required=True, type=PATH, help="checkpoint to write (an existing checkpoint of your own "
                                                           "there is replaced; a run's best.pt or last.pt never)")
    p.add_argument("--size", help="input size for weights-only files: 224 or HxW (e.g. 96x80)")


def run_import_keras(args) -> int:
    from ..interop.keras_import import import_keras
    check_output(args.out, args.model)
    check_replaceable(args.out, "checkpoint")
    size = None
    if args.size:
        if not re.fullmatch(r"[1-9]\d*(x[1-9]\d*)?", args.size.lower()):
            raise PneumoniaCNNError(f"--size {args.size}: give one size (224) or HEIGHTxWIDTH (96x80)")
        parts = [int(p) for p in args.size.lower().split("x")]
        if not all(16 <= part <= 4096 for part in parts):  # train's input-size range
            raise PneumoniaCNNError(f"--size {args.size}: each side must be from 16 to 4096 pixels")
        size = (parts[0], parts[-1])
    _, payload = import_keras(args.model, args.out, size)
    height, width = payload["preprocessing"]["size"]
    print(f"imported {args.model}: seed model, input {height}x{width}x{payload['preprocessing']['channels']}, "
          f"{payload['parameters']:,} parameters -> {args.out}")
    return 0


# why each command that scores images apart from one another takes no batch step (``--prevalence estimate``,
# ``--adapt-batch``): what it scores together is not one site's batch chosen together, and the same image would
# get another probability from one arrival to the next
SCORED_APART = {
    "pacs": "scores what is new in the PACS since its last run, --batch-size instances at a time, not one site's "
            "batch chosen together",
    "listen": "scores instances as they arrive, a few at a time, not one site's batch chosen together",
    "explain": "scores each image on its own",
}


def add_scoring_options(p, command: str):
    """``--prevalence RATE`` and ``--engine``, as ``predict`` and ``serve`` take them: the same image gets the same
    probability and label from every command under the same options. The batch steps are refused
    (``check_scoring_options``)."""
    p.add_argument("--prevalence", metavar="RATE",
                   help="state probabilities for this pneumonia rate (e.g. 0.3), as predict and serve "
                        f"--prevalence RATE do; 'estimate' is refused: {command} {SCORED_APART[command]}")
    p.add_argument("--adapt-batch", action="store_true", help=argparse.SUPPRESS)  # refused, with the reason
    add_engine(p)
    if command == "explain":  # the engine scores; the heat map needs a model's gradients
        engine = p._option_string_actions["--engine"]
        engine.help += "; the heat map is torch's Grad-CAM whichever engine gives the probability and label"


def check_scoring_options(args, command: str) -> None:
    """Before any work: the rate as predict and serve check it; the batch steps refused in one line."""
    from ..inference.predictor import parse_prevalence
    if parse_prevalence(args.prevalence, estimate=False) == "estimate":  # refused below, with why
        raise PneumoniaCNNError(f"--prevalence estimate: {command} {SCORED_APART[command]}; estimate the site's rate "
                                f"with predict --prevalence estimate on a batch of its images, then give it "
                                f"(--prevalence 0.3)")
    if args.adapt_batch:
        raise PneumoniaCNNError(f"--adapt-batch: {command} {SCORED_APART[command]}; adapt the model to the site once "
                                f"(pneumonia-cnn adapt) and give {command} the adapted checkpoint")


def scoring_predictor(args):
    """The ``Predictor`` predict and serve build for ``--device``, ``--engine`` and ``--prevalence`` (checked
    before, by ``check_scoring_options``, ahead of any work); the rate used said on stderr, as predict says it."""
    from ..inference import Predictor
    predictor = Predictor(args.checkpoint, args.device, engine=args.engine, prevalence=args.prevalence)
    if predictor.prevalence is not None:
        log.info("probabilities %s", predictor.prevalence_mode()["description"])
    return predictor


def add_network_options(p):
    p.add_argument("--overlay", action="store_true", help="also store the Grad-CAM overlay as a Secondary Capture "
                                                          "image in the same study")
    p.add_argument("--retries", type=whole_number(0), default=3,
                   help="retries of a failed network call (exponential back-off)")
    p.add_argument("--backoff", type=positive_number, default=1.0, help="seconds before the first retry (then doubled)")
    add_device(p)


def pacs_arguments(p):
    p.add_argument("checkpoint", type=PATH, help="best.pt or run folder (or builtin: named, since the option lists "
                                                 "after it would otherwise take a model's name as one of theirs)")
    p.add_argument("--dicomweb", required=True, metavar="URL", help="DICOMweb root, e.g. http://pacs:8042/dicom-web")
    p.add_argument("--state", default="pacs_state.sqlite", type=PATH, help="SQLite file remembering what was scored")
    p.add_argument("--modality", nargs="+", default=["CR", "DX"], help="modalities to look for (DICOM codes: CR, "
                                                                       "DX...)")
    p.add_argument("--study-date", metavar="RANGE", help="YYYYMMDD or YYYYMMDD-YYYYMMDD (either side may be open)")
    p.add_argument("--batch-size", type=whole_number(1), default=16, help="instances scored together")
    p.add_argument("--timeout", type=positive_number, default=60,
                   help="seconds to wait for the PACS: to connect, and between bytes of an answer")
    p.add_argument("--answer-timeout", type=positive_number, default=600,
                   help="seconds a whole answer may take once it has begun (a PACS trickling it is given up)")
    p.add_argument("--user", help="HTTP user (password in PNEUMONIA_CNN_DICOMWEB_PASSWORD; or a bearer token in "
                                  "PNEUMONIA_CNN_DICOMWEB_TOKEN)")
    p.add_argument("--give-up-after", type=whole_number(1), default=3, metavar="RUNS",
                   help="stop fetching an instance the PACS itself refused (HTTP 404/410, a STOW-RS failure reason) "
                        "in this many runs, at least 10 minutes apart")
    p.add_argument("--max-instance-mb", type=positive_number, default=256, metavar="MB",
                   help="largest instance fetched; a larger one is not read, and counted unreadable")
    p.add_argument("--retry-given-up", action="store_true",
                   help="fetch the instances given up on again (once, at the start)")
    p.add_argument("--refusal-spacing", type=float, default=600.0, help=argparse.SUPPRESS)  # tests: 0
    p.add_argument("--watch", action="store_true", help="keep polling for new instances")
    p.add_argument("--interval", type=positive_number, default=30, help="seconds between polls with --watch")
    p.add_argument("--polls", type=whole_number(1), help=argparse.SUPPRESS)  # tests: stop after N polls
    add_network_options(p)
    add_scoring_options(p, "pacs")


def modality_codes(values) -> tuple[str, ...]:
    """--modality's values as DICOM Modality codes (CS: 1 to 16 capitals, digits, underscores or spaces), given in
    any case, or a one-line error before any work. "D\\X" (two values), "*" or "CR,DX" went into the QIDO-RS
    query as they were and matched nothing: "0 new instance(s)", exit 0, on every run. Checked here rather than
    by an argparse type, which would take a model named after the list ("--modality CR runs/b") for a bad code
    instead of saying the model is missing."""
    codes = []
    for text in values:
        code = text.strip(" ").upper()  # CS pads with spaces; a newline is no padding
        # no modality code holds a space: "CR DX" in one value (a unit file's quoting) matched nothing, exit 0
        if not re.fullmatch(r"[A-Z0-9_]{1,16}", code):
            raise PneumoniaCNNError(f"--modality '{text}': not a DICOM modality code (1 to 16 letters, digits or "
                                    "underscores, such as CR or DX; several as separate values: --modality CR DX)")
        codes.append(code)
    return tuple(codes)


def run_pacs(args) -> int:
    from ..interop.dicomweb import PacsJob, PacsOptions, check_date_range
    from ..interop.dicomweb_session import check_url
    modalities = modality_codes(args.modality)  # all before the model loads: refused at once
    check_url(args.dicomweb)
    check_scoring_options(args, "pacs")
    options = PacsOptions(args.dicomweb, args.state, modalities,
                          check_date_range(args.study_date), args.overlay, args.batch_size, args.retries + 1,
                          args.backoff, timeout=args.timeout, answer_timeout=args.answer_timeout, user=args.user,
                          give_up_after=args.give_up_after,
                          refusal_spacing=args.refusal_spacing, retry_given_up=args.retry_given_up,
                          max_instance_mb=args.max_instance_mb)
    job = PacsJob(scoring_predictor(args), options)
    job.on_stored = print_pacs_result  # each as it is stored: a run that ends early has printed what it did
    if args.watch:  # SIGTERM (systemd's stop): exit 0; Ctrl-C: 130, as listen
        return 130 if job.watch(args.interval, args.polls, print_pacs_summary) == "SIGINT" else 0
    summary = job.run_once()
    print_pacs_summary(summary)
    return 1 if summary["failed"] or summary["given_up"] else 0


def print_pacs_result(result):
    """One stored result's line, flushed: a SIGTERM's exit (or a failure after it) must not lose it."""
    from ..interop.scoring import shown_result
    entry = result.entry
    flag = {True: "in distribution", False: "OUTSIDE the training population", None: "?"}[entry["in_distribution"]]
    print(f"{result.sop_instance_uid}  {shown_result(entry)}  {flag}  "
          f"-> SR {result.report_uid}" + (f" + overlay {result.overlay_uid}" if result.overlay_uid else "")
          + (" (overlay refused by the PACS)" if result.overlay_refused else "")
          + (f" ({result.overlay_error})" if result.overlay_error else "")
          + "".join(f"\n    warning: {w}" for w in entry["warnings"]), flush=True)


def print_pacs_summary(summary: dict):
    """A pass's counts, after its results (each printed as it was stored: ``print_pacs_result``)."""
    print(f"{summary['found']} new instance(s), {summary['already_scored']} already scored: {summary['scored']} "
          f"scored and reported, {summary['unreadable']} unreadable, {summary['skipped']} not X-rays, "
          f"{summary['failed']} failed (tried again next run)"
          + (f", {summary['given_up']} given up (refused by the PACS run after run)" if summary["given_up"]
             else "")
          + (f"; {summary['given_up_before']} given up earlier (--retry-given-up)" if summary["given_up_before"]
             else "")
          + (f"; {summary['overlays_refused']} overlay(s) refused by the PACS (their reports are stored)"
             if summary.get("overlays_refused") else "")
          + (f"; the PACS became unreachable: {summary['left']} instance(s) left for the next run"
             if summary.get("unreachable") else ""))


def listen_arguments(p):
    p.add_argument("checkpoint", type=PATH, help="best.pt or run folder (or builtin: named, since the option lists "
                                                 "after it would otherwise take a model's name as one of theirs)")
    p.add_argument("--send-to", required=True, metavar="HOST:PORT:AET", help="where the reports go (C-STORE)")
    p.add_argument("--port", type=PORT, default=11112, help="DICOM port to listen on")
    p.add_argument("--ae-title", default="PNEUMONIA", help="this node's AE title")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (loopback unless told otherwise; "
                                                       "0.0.0.0 for the hospital network)")
    p.add_argument("--spool", type=PATH, help="folder for received instances until their report is delivered "
                                   "(default: ~/.cache/pneumonia-cnn/listen-spool)")
    p.add_argument("--modality", nargs="+", default=["CR", "DX"],
                   help="modalities scored; instances of others are acknowledged and not scored")
    p.add_argument("--retry-after", type=positive_number, default=60,
                   help="seconds before an undelivered report is retried")
    p.add_argument("--give-up-after", type=whole_number(1), default=3, metavar="TIMES",
                   help="a report the destination refuses (a C-STORE failure status) this many times is set aside "
                        "in SPOOL/refused")
    p.add_argument("--answer-timeout", type=positive_number, default=120, metavar="SECONDS",
                   help="seconds to wait for the destination's answer to each report's C-STORE (no answer: sent "
                        "again later)")
    p.add_argument("--max-instance-mb", type=positive_number, default=256, metavar="MB",
                   help="largest instance accepted; the association sending a larger one is aborted once this much "
                        "of it has arrived, and nothing is kept")
    p.add_argument("--accept-from", nargs="+", default=[], metavar="AET",
                   help="calling AE titles accepted (the PACS, the modalities); others are rejected (default: any)")
    p.add_argument("--tls-cert", metavar="PEM", type=PATH, help="DICOM TLS: this node's certificate (with --tls-key)")
    p.add_argument("--tls-key", metavar="PEM", type=PATH, help="DICOM TLS: the key of --tls-cert")
    p.add_argument("--tls-ca", metavar="PEM", type=PATH,
                   help="accept only senders whose TLS certificate this CA signed")
    p.add_argument("--send-tls-ca", metavar="PEM", type=PATH,
                   help="send reports over TLS, verifying the destination's certificate against this CA (--tls-cert is "
                        "offered as ours)")
    add_network_options(p)
    add_scoring_options(p, "listen")


def run_listen(args) -> int:
    from ..inference.sessions import IDLE_THREADS, idle_threads
    from ..interop.dicom_access import NodeAccess, check_ae_title
    from ..interop.listener import Destination, Listener
    from ..interop.spool import default_spool, open_spool, spool_lock
    destination = dataclasses.replace(Destination.parse(args.send_to), answer_timeout=args.answer_timeout)
    modalities = modality_codes(args.modality)  # as pacs': a typo would leave every instance unscored
    access = NodeAccess(tuple(args.accept_from), args.tls_cert, args.tls_key, args.tls_ca, args.send_tls_ca)
    check_ae_title(args.ae_title, "--ae-title")
    check_scoring_options(args, "listen")
    spool = open_spool(args.spool or default_spool())  # before the model loads: a bad --spool is said at once,
    spool_lock(spool).acquire().release()  # and so is a spool another node is using
    os.environ.setdefault(IDLE_THREADS, "sleep")  # as serve's: the network threads share the cores with scoring
    idle_threads()
    listener = Listener(scoring_predictor(args), destination, args.ae_title, args.port, args.host,
                        args.spool, args.overlay, args.retries + 1, args.backoff, args.retry_after,
                        modalities=modalities, give_up_after=args.give_up_after,
                        max_instance_mb=args.max_instance_mb, access=access)
    listener.start(block=True)
    return 0


COMMANDS = [
    Command("export", "export to ONNX or TorchScript with metadata", export_arguments, run_export,
            ("pneumonia-cnn export runs/best/best.pt --format onnx --out model.onnx",
             "pneumonia-cnn export runs/best --format onnx-int8 --data chest_xray --out model.int8.onnx")),
    Command("import-keras", "import the tutorial's trained Keras model (.h5, .keras, .weights.h5)",
            import_keras_arguments, run_import_keras,
            ("pneumonia-cnn import-keras model.h5 --out keras.pt",)),
    Command("pacs", "score new X-rays in a PACS over DICOMweb and store a DICOM SR in each study", pacs_arguments,
            run_pacs, ("pneumonia-cnn pacs runs/best --dicomweb http://pacs:8042/dicom-web --study-date 20240101-",
                       "pneumonia-cnn pacs runs/best --dicomweb http://pacs:8042/dicom-web --watch --overlay")),
    Command("listen", "DICOM node: receive X-rays by C-STORE, send a DICOM SR for each to a destination",
            listen_arguments, run_listen,
            ("pneumonia-cnn listen runs/best --port 11112 --ae-title PNEUMONIA --send-to pacs:4242:ORTHANC "
             "--host 0.0.0.0",)),
]
