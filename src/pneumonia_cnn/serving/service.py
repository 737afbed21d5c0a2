"""The service behind the routes: reading uploads, scoring, Grad-CAM, the audit trail, drift and reloads.

Threads, each with its own job, so that no two jobs share a model's state: the micro-batcher's one scorer
thread runs every batched forward pass; one Grad-CAM thread runs backward passes on a private copy of the
model; one thread scores site batches (/predict/batch); one checks new API keys (scrypt). Decoding runs on
at most four threads, which bounds the memory that large uploads take at once.
"""
from __future__ import annotations

import asyncio
import base64
import ctypes
import hashlib
import json
import logging
import math
import os
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..data.dicom_guard import dicom_problem
from ..errors import ImageReadError, PneumoniaCNNError
from ..explanation import grad_cam, overlay_png
from ..monitoring import DriftMonitor, same_reference
from .audit import AuditLog, AuditUnavailable, utc_now
from .auth import KeyRing
from .batcher import MicroBatcher, load_served_model, use_torch_threads
from .metrics import ServiceMetrics

log = logging.getLogger(__name__)
DRIFT_CHECK_EVERY = 25  # images between drift checks (a check is cheap, but not free)
DECODE_THREADS = min(4, os.cpu_count() or 1)  # large decodes hold their full-size pixels: bound how many at once
# served Grad-CAM overlays trade a few more bytes for time: at zlib's usual level the encoding took longer than the
# map itself (docs/hospital.md, "Sharing the cores")
SERVED_OVERLAY_COMPRESSION = 1
LARGE_IMAGE_PIXELS = 4_000_000  # decodes this large leave tens of MB in glibc's arenas: trim after them


LIMIT_CEILING = {"max_upload_mb": 4096, "max_batch_upload_mb": 65536, "body_timeout": 86400,  # MB, MB, s
                 "admission_wait": 3600}  # seconds
COUNT_CEILING = 1_000_000


@dataclass
class ServeOptions:
    device: str = "auto"
    engine: str = "auto"
    max_upload_mb: float = 20
    max_batch_upload_mb: float = 256
    max_batch_files: int = 256
    max_batch: int = 16
    max_in_flight: int = 64
    max_batches_in_flight: int = 2
    admission_wait: float = 10
    body_timeout: float = 30
    prevalence: object = None
    adapt_batch: bool = False
    api_keys: str | None = None
    audit_log: str | None = None
    keep_images: str | None = None
    drift_window: int = 500

    def __post_init__(self):
        """Refuse limits that would make the server refuse everything or nothing (named as the flags); the
        ceilings are far above any real use and keep a typo from becoming an index overflow on every upload."""
        for name in ("max_upload_mb", "max_batch_upload_mb", "body_timeout", "admission_wait"):
            value, ceiling, zero_allowed = float(getattr(self, name)), LIMIT_CEILING[name], name == "admission_wait"
            if not (math.isfinite(value) and (0 <= value if zero_allowed else 0 < value) and value <= ceiling):
                kind = f"a number from 0 to {ceiling:,}" if zero_allowed else \
                    f"a positive number of at most {ceiling:,}"
                raise PneumoniaCNNError(f"--{name.replace('_', '-')} {value:g}: must be {kind}")
        for name in ("max_batch_files", "max_batch", "max_in_flight", "max_batches_in_flight", "drift_window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= COUNT_CEILING:
                raise PneumoniaCNNError(f"--{name.replace('_', '-')} {value}: must be a whole number from 1 to "
                                        f"{COUNT_CEILING:,}")
        if self.keep_images and not self.audit_log:  # the kept files are found through the log's rows alone
            raise PneumoniaCNNError(f"--keep-images {self.keep_images} needs --audit-log FILE (the kept images are "
                                    f"found through its rows): give both, or neither")

    @property
    def max_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    def body_limit(self, path: str) -> int:
        """Bytes a request body may have: a batch holds many images; the multipart framing adds a little."""
        if path == "/predict/batch":
            return int(self.max_batch_upload_mb * 1024 * 1024)
        return self.max_bytes + 64 * 1024

    def describe_limit(self, path: str) -> str:
        """The limit as the operator set it (the framing allowance above is ours, not theirs to know)."""
        if path == "/predict/batch":
            return f"the limit is {self.max_batch_upload_mb:g} MB per batch upload (--max-batch-upload-mb)"
        return f"the limit is {self.max_upload_mb:g} MB per image (--max-upload-mb)"


class RequestError(Exception):
    def __init__(self, status: int, detail: str, headers: dict | None = None):
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers


class ClientGone(RequestError):
    """The client closed the connection before its answer: the work left for it is not done (nginx's 499)."""

    def __init__(self):
        super().__init__(499, "the client closed the request")


def check_client(gone) -> None:
    """``gone``: a ``threading.Event`` set when the client has left (``None``: never checked)."""
    if gone is not None and gone.is_set():
        raise ClientGone()


def display_name(filename: str | None) -> str:
    """The client's file name as a label only: its last path component, printable, at most 200 characters.

    Browsers percent-encode exactly three characters of a file name in multipart/form-data (the WHATWG HTML
    standard's rule, which Chrome and Firefox follow): '"' as %22, CR as %0D and LF as %0A; "%" itself is left
    alone. Those three, upper case as sent, are decoded in one pass, and nothing else is, so a name that holds
    "%20" or "%41" keeps it (a name that truly holds "%22" cannot be told from one holding '"': the standard's
    own ambiguity). CR, LF and every other character that is not printable then become "?".

    The name is cut at the last "/" or "\\": browsers send the name alone, but old ones (Internet Explorer,
    Edge before Chromium) sent the whole Windows path ("C:\\Users\\...\\x.jpeg"), and a path names a folder
    on the client's machine, which is no label. A name that truly holds a "\\" (possible on Linux and macOS)
    keeps only what follows it here; the web page labels its results with the browser's own name instead.
    """
    decoded = re.sub(r"%(22|0D|0A)", lambda match: chr(int(match.group(1), 16)), filename or "")
    name = re.split(r"[\\/]", decoded)[-1]
    name = "".join(c if c.isprintable() else "?" for c in name).strip()[:200]
    return name or "upload"


def read_upload(predictor, data: bytes, name: str):
    """bytes -> (pixels, meta, sha256); ImageReadError with a one-line reason for anything refused."""
    if not data:
        raise ImageReadError(name, "empty file (0 bytes)")
    problem = dicom_problem(data)
    if problem:
        raise ImageReadError(name, problem)
    pixels, meta = predictor.preprocess_bytes(data, name)
    if meta.original_size[0] * meta.original_size[1] >= LARGE_IMAGE_PIXELS:
        release_freed_memory()
    return pixels, meta, hashlib.sha256(data).hexdigest()


def read_unless_gone(gone, predictor, data: bytes, name: str):
    """``read_upload`` on a decode thread, unless the client left while the file waited for its turn."""
    check_client(gone)
    return read_upload(predictor, data, name)


def too_many_files(limit: int, count: int | None = None) -> str:
    """The refusal of a batch over the server's file limit (``count``: None when reading stopped past it)."""
    sent = f"{count:,} files" if count is not None else f"more than {limit:,} files"
    return (f"{sent}: /predict/batch takes at most {limit:,} files per request (serve --max-batch-files); send the "
            f"rest in another request")


def load_dicom_reader() -> None:
    import pydicom.filereader  # noqa: F401
    dicom_problem(b"\x08\x00\x16\x00UI\x02\x00\x31\x00")  # the guard's own first call loads what it uses


def release_freed_memory() -> None:
    """Hand the pages a large decode freed back to the system (glibc keeps them in per-thread arenas)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


class Service:
    def __init__(self, checkpoint, options: ServeOptions):
        self.checkpoint, self.options = str(checkpoint), options
        self.metrics = ServiceMetrics()
        self.served = self._load()
        self.keyring = KeyRing.from_file(options.api_keys) if options.api_keys else None
        self.audit = AuditLog(options.audit_log, options.keep_images) if options.audit_log else None
        self.drift = DriftMonitor(self.served.reference, options.drift_window, no_reference=self.served.no_reference)
        self.drift_alerted = False  # a drift warning logged and no return within the levels since
        self.batcher = MicroBatcher(options.max_batch, on_batch=self.metrics.batch_size.observe)
        self.gradcam_executor = ThreadPoolExecutor(1, thread_name_prefix="gradcam")
        self.batch_executor = ThreadPoolExecutor(1, thread_name_prefix="site-batch")
        self.auth_executor = ThreadPoolExecutor(1, thread_name_prefix="api-keys")
        self.decode_executor = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="decode")
        # a batch's files (up to --max-batch-files of them) decode on threads of their own: in the shared pool they
        # queued ahead of every single upload arriving after them (24 s for one X-ray behind one batch)
        self.batch_decode_executor = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="batch-decode")
        self.reload_lock: asyncio.Lock | None = None
        self.metrics.set_model(self.served.model_id)

    def _load(self):
        o = self.options
        served = load_served_model(self.checkpoint, o.device, o.engine, o.prevalence, o.adapt_batch)
        # its single-image predictor keeps the checkpoint's rate under --prevalence estimate (strangers' images are
        # not one site's batch): told so, its answers' notes and /model say it (they were empty, and showed no rate)
        served.predictor.answer_single(o.prevalence)
        return served

    async def start(self):
        self.reload_lock = asyncio.Lock()
        # the DICOM reader and its decoders (pydicom, GDCM, CharLS: about 30 MB) loaded before the first request,
        # not inside the first DICOM upload's time and memory (junk uploads no longer load them: the first bytes
        # decide, so the first DICOM could be the first to)
        await asyncio.get_running_loop().run_in_executor(self.decode_executor, load_dicom_reader)
        await self.batcher.start()

    async def stop(self):
        await self.batcher.stop()
        for executor in (self.gradcam_executor, self.batch_executor, self.auth_executor, self.decode_executor,
                         self.batch_decode_executor):
            executor.shutdown(wait=True)
        if self.audit:
            self.audit.close()

    # ---------- predictions
    async def _read(self, served, data: bytes, filename: str | None, executor=None, gone=None):
        name = display_name(filename)
        try:
            pixels, meta, sha = await asyncio.get_running_loop().run_in_executor(
                executor or self.decode_executor, read_unless_gone, gone, served.predictor, data, name)
        except ImageReadError as error:
            self.metrics.errors.inc()
            raise RequestError(400, f"{name}: {error.reason}") from None
        return name, pixels, meta, sha

    async def predict_one(self, data: bytes, filename: str | None, gradcam: bool, key_id: str | None,
                          gone=None) -> dict:
        """One image's answer; ``gone`` (see ``check_client``) stops the work once its client has left, so a
        queue of abandoned Grad-CAM requests neither delays the next ones nor is recorded as answered."""
        served, request_id = self.served, uuid.uuid4().hex
        if len(data) > self.options.max_bytes:
            raise RequestError(413, f"{display_name(filename)}: {self._too_large()}")
        name, pixels, meta, sha = await self._read(served, data, filename, gone=gone)
        check_client(gone)
        entry = await self.batcher.submit(served, pixels, meta)
        notes = served.predictor.batch_notes()  # --prevalence estimate: why one image's rate was not estimated
        response = {"request_id": request_id, "filename": name, **public_entry(entry), "model": served.model_id,
                    "notes": notes}
        response["prevalence_source"] = next((n for n in notes if n.startswith("prevalence not estimated")),
                                             response["prevalence_source"])
        if gradcam:
            response["gradcam_png_base64"] = await self._gradcam(served, pixels, gone)
        check_client(gone)
        await self._account(served, request_id, "predict", key_id, [(entry, sha, data, meta)])
        return response

    async def _gradcam(self, served, pixels, gone=None) -> str:
        def heat():
            check_client(gone)  # checked when its turn on the one Grad-CAM thread comes, not when queued
            use_torch_threads(served.torch_threads)
            with self.metrics.gradcam_seconds.time():
                cam = grad_cam(served.gradcam_model, pixels, served.predictor.device)
                png = overlay_png(pixels, cam, compress_level=SERVED_OVERLAY_COMPRESSION)
                return base64.b64encode(png).decode("ascii")
        return await asyncio.get_running_loop().run_in_executor(self.gradcam_executor, heat)

    async def predict_batch(self, uploads: list[tuple[bytes, str | None]], key_id: str | None, gone=None) -> dict:
        """``gone`` as ``predict_one``'s: a batch whose client has left is neither scored nor audited."""
        served, request_id = self.served, uuid.uuid4().hex
        if not uploads:
            raise RequestError(400, "no files: send one or more 'files' fields")
        if len(uploads) > self.options.max_batch_files:
            raise RequestError(413, too_many_files(self.options.max_batch_files, len(uploads)))
        check_client(gone)
        # each file checks ``gone`` as its decode begins: a batch left by its client stops decoding at once
        results = await asyncio.gather(*[self._read_or_error(served, data, name, gone) for data, name in uploads])
        check_client(gone)
        good = [r for r in results if "error" not in r]
        notes = list(served.batch_predictor.batch_notes())
        if good:
            def assess():
                check_client(gone)  # checked when the batch thread takes it up, not when queued
                use_torch_threads(served.torch_threads)
                return served.batch_predictor.assess(np.stack([r["pixels"] for r in good]), [r["meta"] for r in good])
            entries, notes = await asyncio.get_running_loop().run_in_executor(self.batch_executor, assess)
            for result, entry in zip(good, entries):
                result["entry"] = entry
            check_client(gone)
            await self._account(served, request_id, "predict/batch", key_id,
                                [(r["entry"], r["sha"], r["data"], r["meta"]) for r in good])
        out = [{"filename": r["name"], "error": r["error"]} if "error" in r else
               {"filename": r["name"], **public_entry(r["entry"])} for r in results]
        return {"request_id": request_id, "model": served.model_id, "notes": notes, "results": out}

    def _too_large(self) -> str:
        return f"upload too large; {self.options.describe_limit('/predict')}"

    async def _read_or_error(self, served, data, filename, gone=None) -> dict:
        if len(data) > self.options.max_bytes:
            return {"name": display_name(filename), "error": self._too_large()}
        try:
            name, pixels, meta, sha = await self._read(served, data, filename, self.batch_decode_executor, gone)
        except ClientGone:
            raise
        except RequestError as error:
            return {"name": display_name(filename), "error": error.detail.split(": ", 1)[-1]}
        return {"name": name, "pixels": pixels, "meta": meta, "sha": sha, "data": data}

    async def _account(self, served, request_id, endpoint, key_id, scored) -> None:
        """Audit (before the answer goes out), then metrics and the drift window."""
        if self.audit is not None:
            time = utc_now()
            rows = [audit_row(request_id, index, time, key_id, endpoint, sha, served.model_id, entry)
                    for index, (entry, sha, _, _) in enumerate(scored)]
            images = [(data, image_suffix(meta)) for _, _, data, meta in scored]
            try:
                await self.audit.record(rows, images if self.audit.keep_images else None)
            except AuditUnavailable as error:
                raise RequestError(503, f"audit log unavailable ({error}); prediction withheld",
                                   {"Retry-After": "5"}) from None
        for entry, sha, _, _ in scored:
            self.metrics.observe_prediction(entry)
            if not entry.get("batch_adapted"):  # scored by its own batch's statistics: not what the reference holds
                self.drift.add(entry["raw_score"], entry.get("ood_score"), key=sha)  # a resent file counts once
        if self.drift.seen % DRIFT_CHECK_EVERY < len(scored):  # a report of an unchanged window is cached
            # off the event loop: the first report at a new window size simulates its chance levels (~0.6 s)
            await asyncio.to_thread(self.drift_report)

    # ---------- health, drift, reload
    def drift_report(self) -> dict:
        report = self.drift.report()
        self.metrics.set_drift(report)
        status = report["status"]
        # one warning per episode: a window hovering at the drift level moves between warning and drift
        # (logged 14 times in 2 minutes under load); only a return to ok ends the episode
        if status == "drift" and not self.drift_alerted:
            parts = ", ".join(f"{n}: PSI {report[n]['psi']:.2f}, KS p={report[n]['ks_pvalue']:.1g}"
                              for n in ("raw_scores", "ood_scores") if n in report)
            log.warning("drift: the last %d images differ from the validation reference (%s)", report["images"], parts)
            self.drift_alerted = True
        elif status == "ok" and self.drift_alerted:
            log.warning("drift: back within the levels over the last %d images", report["images"])
            self.drift_alerted = False
        return report

    async def health(self) -> tuple[int, dict]:
        """(HTTP status, body): 503 while the audit log cannot be written, since every prediction is then
        refused and a load balancer should send them elsewhere."""
        served = self.served
        problem = None
        if self.audit is not None and self.audit.last_error is not None:  # a probe only after a failed write
            problem = await asyncio.get_running_loop().run_in_executor(None, self.audit.problem)
        drift = await asyncio.to_thread(self.drift_report)  # its chance levels may need simulating: off the loop
        body = {"status": "ok" if problem is None else f"audit log unavailable ({problem}): predictions refused",
                "model": served.model_id, "loaded_at": served.loaded_at, "drift": drift,
                "audit": self.audit is not None, "api_keys": self.keyring is not None}
        return (200 if problem is None else 503), body

    async def reload(self, reason: str) -> dict:
        async with self.reload_lock:
            previous = self.served
            try:
                loop = asyncio.get_running_loop()
                served = await loop.run_in_executor(None, self._load)
                keyring = (await loop.run_in_executor(None, KeyRing.from_file, self.options.api_keys)
                           if self.options.api_keys else None)
            except Exception as error:  # a half-copied or corrupt checkpoint: keep serving the old model
                message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                self.metrics.reloads.labels("failed").inc()
                log.error("reload (%s) failed, still serving %s: %s", reason, previous.model_id, message)
                return {"status": "failed", "reason": message, "model": previous.model_id}
            self.served, self.keyring = served, keyring.keep_passed(self.keyring) if keyring else None
            # a reload of the same model (to rotate API keys) had emptied the window and cleared a drift alert
            if (served.model_id, served.no_reference) != (previous.model_id, previous.no_reference) or \
                    not same_reference(served.reference, previous.reference):
                self.drift = DriftMonitor(served.reference, self.options.drift_window, no_reference=served.no_reference)
                self.drift_alerted = False
            self.metrics.set_model(served.model_id)
            self.metrics.reloads.labels("ok").inc()
            log.warning("reloaded (%s): now serving %s (was %s)", reason, served.model_id, previous.model_id)
            return {"status": "reloaded", "model": served.model_id, "previous": previous.model_id}


def public_entry(entry: dict) -> dict:
    keys = ("probability", "label", "threshold", "prevalence", "prevalence_source", "in_distribution", "ood_score",
            "ood_threshold", "warnings")
    return {key: entry.get(key) for key in keys}


def audit_row(request_id, index, time, key_id, endpoint, sha, model_id, entry) -> dict:
    inside = entry.get("in_distribution")
    return {"request_id": request_id, "item": index, "time": time, "key_id": key_id, "endpoint": endpoint,
            "image_sha256": sha, "model_id": model_id, "probability": entry["probability"],
            "raw_score": entry.get("raw_score"), "label": entry["label"] or "", "threshold": entry["threshold"],
            "in_distribution": None if inside is None else int(inside), "ood_score": entry.get("ood_score"),
            "warnings": json.dumps(entry.get("warnings") or [])}


def image_suffix(meta) -> str:
    fmt = re.sub(r"[^a-z0-9]", "", str(getattr(meta, "source_format", "") or "").lower())
    return ".dcm" if fmt == "dicom" else f".{fmt or 'bin'}"
