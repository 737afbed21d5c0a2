"""``listen``: a DICOM node (pynetdicom) that modalities and PACS send X-rays to with C-STORE; each X-ray is
scored and its Structured Report (and the optional Grad-CAM overlay) sent on to a destination; C-ECHO answers.

A received instance is first written to a spool folder (atomically) and acknowledged; a worker thread scores
what the spool holds and deletes each file only once its report has been accepted by the destination. So a
destination that is down delays reports (retried with back-off, then again later) but loses none, a restart
picks up what was left, and the sender is never kept waiting on scoring. Reports, overlays and other
non-images are not scored, so a PACS that forwards everything cannot loop our reports back to us.
"""
from __future__ import annotations

import collections
import logging
import os
import queue
import re
import signal
import threading
import time
import uuid
from pathlib import Path

from ..errors import PneumoniaCNNError
from ..fileio import atomic_path, display_path, over_limit
from ..signals import StopSignals
from .arrival import ABORTED_HERE, ArrivalLimit, decodable_transfer_syntaxes, peer, receive_into
from .dicom_access import NodeAccess, check_ae_title, rejection_reason, tls_handshake
from .dicom_send import OUT_OF_RESOURCES, Destination, DestinationUnreachable, send_c_store
from .network import TransferError, with_retries
from .scoring import DicomScorer, not_an_image, other_modality_class, shown_result
from .spool import RefusalCounts, SpoolHold, move_file, open_spool, remove_partial_receipts, spool_lock, uid_of
from .spool_intake import kept, read_spooled, remove_unscored, set_aside

log = logging.getLogger("pneumonia_cnn")


class Listener:
    def __init__(self, predictor, destination: Destination, ae_title: str = "PNEUMONIA", port: int = 11112,
                 host: str = "127.0.0.1", spool=None, overlay: bool = False, attempts: int = 4,
                 backoff: float = 1.0, retry_after: float = 60.0, batch_size: int = 8, modalities=("CR", "DX"),
                 give_up_after: int = 3, max_instance_mb: float = 256, access: NodeAccess | None = None):
        check_ae_title(ae_title, "--ae-title")
        self.scorer = DicomScorer(predictor, overlay=overlay)
        self.modalities = tuple(m.upper() for m in modalities)  # as pacs --modality: a routed CT is not scored
        self.destination, self.ae_title, self.address = destination, ae_title, (host, port)
        self.spool = open_spool(spool)  # None: default_spool()
        self.attempts, self.backoff, self.retry_after, self.batch_size = attempts, backoff, retry_after, batch_size
        self.incoming, self.unreadable = self.spool / "incoming", self.spool / "unreadable"
        self.refused, self.give_up_after = self.spool / "refused", give_up_after
        if not 0 < max_instance_mb <= 65536:
            raise PneumoniaCNNError(f"--max-instance-mb {max_instance_mb:g}: expected more than 0 and at most 65536")
        self.max_instance_mb, self.access = max_instance_mb, access or NodeAccess()
        self.arrival = ArrivalLimit(max_instance_mb)
        self.tls = self.access.client_context()  # for the reports; None: plain DICOM
        self.server_tls = self.access.server_context()  # for the images received
        self.refusals = RefusalCounts(self.spool)  # a restart goes on counting where the node stopped
        # spooled files whose report was delivered but which could not be removed (a read-only spool): never
        # sent again while this node runs; each pass tries removing them again
        self.delivered: set[str] = set()
        self.queue: queue.Queue = queue.Queue()
        self.later: list[tuple[float, Path]] = []
        self.next_rescan = self.down_until = 0.0  # the first pass picks up what an earlier run left
        # the latest reports, for the caller (and the tests); bounded, as a node runs for months
        self.sent: collections.deque[dict] = collections.deque(maxlen=1000)
        self.server = self.worker = self.lock = None
        self.stopping = threading.Event()
        self.lifecycle = threading.RLock()  # start's set-up and stop() one at a time; reentrant: no hang

    # ---------- the network side
    def start(self, block: bool = True):
        """Bind the port (a port in use: one line, and nothing in the spool touched), then start the worker;
        ``block``: serve until SIGTERM (then stop, exit 0) or Ctrl-C (stop, then KeyboardInterrupt)."""
        from pynetdicom import evt
        with self.lifecycle:  # a stop() from another thread meanwhile waits for the node to be up, then stops it
            self.lock = SpoolHold(spool_lock(self.spool).acquire())  # released by the last of stop() and worker
            self.stopping.clear()
            try:  # whatever fails before the node runs, the spool's lock is released
                self.server = self._application_entity().start_server(
                    self.address, block=False,  # TLS: the handshake happens in _opened, not in the accept loop
                    evt_handlers=[(evt.EVT_C_STORE, self._receive), (evt.EVT_ABORTED, self._aborted),
                                  (evt.EVT_CONN_OPEN, self._opened), (evt.EVT_DATA_RECV, self.arrival.on_data),
                                  (evt.EVT_CONN_CLOSE, self.arrival.on_close), (evt.EVT_REJECTED, self._rejected)])
            except BaseException as error:
                lock, self.lock = self.lock, None  # released here: a stop() after a failed start has nothing to do
                lock.release()
                if isinstance(error, OSError):
                    raise PneumoniaCNNError(f"cannot listen on {self.address[0]}:{self.address[1]}: "
                                            f"{error.strerror}") from None
                raise
            remove_partial_receipts(self.spool)  # once the port is bound: a refused start touches nothing
            self.worker = threading.Thread(target=self._work, args=(self.lock.worker_starts(),),
                                           name="pneumonia-listen-worker", daemon=True)
            try:
                self.worker.start()
            except BaseException:  # no worker runs: the hold must not wait for one
                self.lock.worker_ended()
                raise
            log.info("listening as %s on %s:%d%s; reports go to %s%s; spool %s", self.ae_title, *self.address,
                     " (TLS)" if self.access.tls_cert else "", self.destination,
                     " (TLS)" if self.access.send_tls_ca else "", display_path(self.spool))
            if self.access.exposure_warning(self.address[0]):
                log.warning("%s", self.access.exposure_warning(self.address[0]))
        if block:
            try:
                self._serve_until_terminated()
            finally:
                self.stop()
        return self

    def _opened(self, event):
        if self.server_tls is not None:
            tls_handshake(self.server_tls, event)
        self.arrival.on_open(event)

    def _application_entity(self):
        from pynetdicom import AE, AllStoragePresentationContexts, _config
        from pynetdicom.sop_class import Verification
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # its failed associations: our one line says it
        # each instance written to a file as it arrives, not gathered in memory (then copied twice to encode it)
        _config.STORE_RECV_CHUNKED_DATASET = True
        ae = AE(ae_title=self.ae_title)
        receive_into(ae, self.spool / "receiving")  # not the system's temporary folder
        self.access.apply(ae)
        syntaxes = decodable_transfer_syntaxes()
        for context in AllStoragePresentationContexts:  # any class; the reader says what is not an X-ray
            ae.add_supported_context(context.abstract_syntax, syntaxes)
        ae.add_supported_context(Verification)
        return ae

    def _serve_until_terminated(self):
        """Until SIGTERM, or ``stop()`` from another thread; the previous SIGTERM handler is restored. Ctrl-C stays
        a KeyboardInterrupt (exit 130)."""
        with StopSignals([signal.SIGTERM]) as sigterm:
            while not (sigterm.wait(0.5) or self.stopping.is_set()):
                pass
        if sigterm:
            log.info("SIGTERM: stopping")

    def stop(self, timeout: float = 30.0, grace: float = 10.0):
        """No new associations; those in progress get ``grace`` seconds to finish (an instance received is
        acknowledged and kept), then are aborted (the sender has no acknowledgement: it sends again); the
        worker finishes the batch it is scoring. What is left in SPOOL/incoming goes out at the next start.
        Idempotent and thread-safe: a stop() during another (a timer's, start's own) waits for it, then does nothing."""
        with self.lifecycle:
            self.stopping.set()  # in here: a start() setting up meanwhile would clear it
            server, self.server = self.server, None  # each part taken by the one stop() that ends it
            if server is not None:
                server.shutdown()  # first: an association accepted meanwhile is in the list below
                active = list(server.active_associations)
                deadline = time.monotonic() + grace
                for association in active:
                    association.join(max(0.0, deadline - time.monotonic()))
                    if association.is_alive():
                        association.abort()
            worker, self.worker = self.worker, None
            if worker is not None and worker.is_alive():
                self.queue.put(None)
                worker.join(timeout)
            lock, self.lock = self.lock, None  # released, and "stopped" said, exactly once
            if lock is not None:
                if not lock.release():
                    log.warning("the worker is still scoring after %g s: the spool stays locked until it ends (a "
                                "report it is sending when this process exits goes out again at the next start)",
                                timeout)
                waiting = len(list(self.incoming.glob("*.dcm")))
                log.info("stopped%s", f"; {waiting} instance(s) in {display_path(self.incoming)} go out at the "
                                      "next start" if waiting else "")

    def _receive(self, event) -> int:
        """C-STORE: move the instance as received (not decoded) into the spool, acknowledge, let the worker score
        it. pynetdicom wrote it to a temporary file as it arrived, and deletes that file if it is still there."""
        uid, sender = str(event.request.AffectedSOPInstanceUID or ""), event.assoc.requestor.ae_title
        if getattr(event.assoc, "is_aborted", False):  # its last fragment passed the limit: the abort said so
            return OUT_OF_RESOURCES
        received = Path(event.dataset_path)
        try:
            size = received.stat().st_size
        except OSError:  # its file could not be written: the association is being aborted, and a line said so
            return OUT_OF_RESOURCES
        if size > self.max_instance_mb * 2**20:
            log.warning("instance %s from %s: refused: %s (--max-instance-mb)", uid, sender,
                        over_limit(size, self.max_instance_mb))
            return OUT_OF_RESOURCES
        # one file per receipt: a copy re-sent while the first is being reported must not be overwritten and
        # then deleted with it, unscored (an identical copy gives the identical report again)
        name = f"{re.sub(r'[^0-9.]', '_', uid)[:64] or 'instance'}.{uuid.uuid4().hex[:12]}"
        try:
            with atomic_path(self.incoming / f"{name}.dcm", mode=0o600) as temporary:  # a patient's image
                move_file(received, temporary)
        except OSError as error:
            log.warning("instance %s from %s: cannot spool (%s)", uid, sender, error)
            return OUT_OF_RESOURCES
        log.info("received instance %s from %s", uid, sender)
        self.queue.put(self.incoming / f"{name}.dcm")
        return 0x0000

    def _rejected(self, event):
        log.warning("association from %s rejected: %s", peer(event.assoc),
                    rejection_reason(event.assoc, self.access.accept_from))

    def _aborted(self, event):
        # a bare connection (a port check, a failed TLS handshake), or aborted by the node, which said why
        if not event.assoc.requestor.ae_title or event.assoc in ABORTED_HERE:
            return
        log.warning("association with %s aborted", peer(event.assoc))

    # ---------- the worker
    def _work(self, hold):
        try:
            self._work_until_stopped()
        finally:
            hold.worker_ended()

    def _work_until_stopped(self):
        while True:
            try:
                batch = self._next_batch()
            except Exception as error:  # noqa: BLE001 - a spool changed by hand must not end the worker
                log.warning("reading the spool failed (%s); trying again", error)
                time.sleep(1.0)
                continue
            if batch is None:
                return
            if batch:
                try:
                    self._process(batch)
                except Exception as error:  # noqa: BLE001 - the node must keep running; the files stay spooled
                    log.warning("scoring %d spooled instance(s) failed (%s); will retry", len(batch), error)
                    self._retry_later(batch)

    def _next_batch(self) -> list[Path] | None:
        now = time.monotonic()
        for due, path in [item for item in self.later if item[0] <= now]:
            self.later.remove((due, path))
            self.queue.put(path)
        if now >= self.next_rescan:
            self.next_rescan = now + self.retry_after
            self._pick_up_moved_back()
        try:
            first = self.queue.get(timeout=0.5)
        except queue.Empty:
            return []
        batch = [first]
        while len(batch) < self.batch_size:
            try:
                batch.append(self.queue.get_nowait())
            except queue.Empty:
                break
        if None in batch:
            return None
        waiting = {path for _, path in self.later}  # queued twice (a receipt the rescan also saw): kept once
        return list(dict.fromkeys(p for p in batch if p.exists() and p not in waiting))

    def _pick_up_moved_back(self):
        """Spooled files the worker does not know of: moved back from SPOOL/refused or SPOOL/unreadable by hand
        (or left by an earlier run), sent again without a restart."""
        known = {path for _, path in self.later} | set(list(self.queue.queue))
        for path in sorted(self.incoming.glob("*.dcm")):
            if not os.path.lexists(path):  # moved away by hand since the listing
                continue
            if path.name in self.delivered:  # its report went: only the file is left to remove
                self._remove_delivered(path)
                continue
            if path.is_symlink() or not path.is_file():  # a link (dangling, or to a file anywhere) is not read
                self._set_aside(path, "not a regular file (a link, a folder or a device): not read")
            elif path not in known:
                log.info("instance %s: found in %s (moved back, or left by an earlier run): queued", uid_of(path),
                         display_path(self.incoming))
                self.queue.put(path)

    def _process(self, paths: list[Path]):
        if time.monotonic() < self.down_until:  # the destination is unreachable: nothing scored again until it may
            return self._retry_later(paths, self.down_until)  # be back (each had taken its retries, and a scoring)
        datasets, files = [], []
        for path in paths:
            if path.name in self.delivered:
                self._remove_delivered(path)
                continue
            dataset, problem = read_spooled(path, self.max_instance_mb)
            try:
                reason = problem or not_an_image(dataset) or self._outside_modalities(dataset)
            except Exception as error:  # noqa: BLE001 - any decoding failure is a bad instance, named below
                problem = f"not readable as DICOM ({type(error).__name__})"
            if problem:
                self._set_aside_or_keep(path, problem, uid_of(path))
            elif reason:
                uid = getattr(dataset, "SOPInstanceUID", uid_of(path))
                log.info("instance %s: not scored (%s)", uid, reason)
                if not remove_unscored(path, uid, self.retry_after):  # kept: this instance only, not its batch
                    self._retry_later([path])
            else:
                datasets.append(dataset), files.append(path)
        for path, result in zip(files, self.scorer.score(datasets) if datasets else []):
            if result.error:  # no pixel data, say
                self._set_aside_or_keep(path, result.error, result.sop_instance_uid)
                continue
            try:  # a spool that fails for one instance does not hold back the batch's other reports
                self._deliver(path, result)
            except OSError as error:
                log.warning("instance %s: %s; kept in the spool, tried again in %.0f s", result.sop_instance_uid,
                            error, self.retry_after)
                self._retry_later([path])

    def _set_aside_or_keep(self, path: Path, reason: str, uid: str):
        """To SPOOL/unreadable; if it cannot be (read-only, full), kept and said why: its batch is not held back."""
        try:
            self._set_aside(path, reason)
        except OSError as error:
            log.warning("instance %s: unreadable: %s; %s", uid, reason, kept(path, self.unreadable, error,
                                                                              self.retry_after))
            self._retry_later([path])

    def _outside_modalities(self, dataset) -> str | None:
        modality = str(getattr(dataset, "Modality", "") or "").upper()
        if modality not in self.modalities:
            return f"modality {modality or 'missing'} is not one of {', '.join(self.modalities)} (--modality)"
        return other_modality_class(dataset)  # a CT slice that says CR: the SOP class decides too

    def _deliver(self, path: Path, result):
        if time.monotonic() < self.down_until:  # found unreachable for another report of this batch
            return self._retry_later([path], self.down_until)
        what = f"instance {result.sop_instance_uid}: C-STORE of its report to {self.destination}"
        try:  # the report first, on its own: an overlay the destination will not take never holds it back
            with_retries(lambda: send_c_store(self.ae_title, self.destination, result.outputs[:1], self.tls), what,
                         self.attempts, self.backoff)
            overlay = self._send_overlay(result)
        except TransferError as error:
            self._undelivered(path, error)
            return
        self.refusals.set(path.name, None)
        self._remove_delivered(path, result.report_uid)
        entry = result.entry
        log.info("instance %s: %s -> report %s sent to %s%s%s", result.sop_instance_uid, shown_result(entry),
                 result.report_uid, self.destination, overlay, "".join(f"; warning: {w}" for w in entry["warnings"]))
        self.sent.append({"sop_instance_uid": result.sop_instance_uid, "report_uid": result.report_uid, **entry})

    def _remove_delivered(self, path: Path, report_uid: str | None = None):
        """A delivered report's spooled instance deleted. One that cannot be (a read-only or failing spool) is
        remembered, so that its report is not sent again while the node runs, and each pass tries again; its
        one line says the report was delivered (after a restart it would be sent again under the same UID)."""
        try:
            path.unlink(missing_ok=True)
        except OSError as error:
            if path.name not in self.delivered:
                self.delivered.add(path.name)
                log.warning("instance %s: its report %s WAS delivered to %s, but %s cannot be removed from the spool "
                            "(%s): not sent again while this node runs", uid_of(path), report_uid, self.destination,
                            display_path(path), error.strerror or error)
            return
        if path.name in self.delivered:
            self.delivered.discard(path.name)
            log.info("instance %s: %s removed from the spool (its report was delivered before)", uid_of(path),
                     display_path(path))

    def _send_overlay(self, result) -> str:
        """The overlay after its report: a destination that refuses it (a failure status, or no presentation
        context for Secondary Capture) leaves the instance delivered, and says so; a busy or unreachable one
        sends the instance again later (the report again under the same UID: replaced, not added)."""
        if len(result.outputs) < 2:
            return f" ({result.overlay_error})" if result.overlay_error else ""
        try:
            with_retries(lambda: send_c_store(self.ae_title, self.destination, result.outputs[1:], self.tls),
                         f"instance {result.sop_instance_uid}: C-STORE of its overlay to {self.destination}",
                         self.attempts, self.backoff)
        except TransferError as error:
            if error.transient:
                raise
            log.warning("%s (the report was stored; the overlay is not sent again)", error)
            return " (overlay refused)"
        return f" + overlay {result.overlay_uid}"

    def _undelivered(self, path: Path, error: TransferError):
        """Kept and tried again later; set aside in SPOOL/refused once the destination has refused this very
        report ``give_up_after`` times (a failure status for its C-STORE), so that it stops taking the worker's
        time from the others. A destination that is down or busy never sets anything aside."""
        count = self.refusals.get(path.name, 0) + bool(error.refusal)
        if error.refusal and count >= self.give_up_after:
            self.refusals.set(path.name, None)
            set_aside(path, self.refused, f"refused {count} times: {error}")  # first: the line below says where
            log.warning("%s; refused %d times: set aside in %s (move it back to %s to send it "
                        "again)", error, count, display_path(self.refused), display_path(self.incoming))
            return
        if error.refusal:
            self.refusals.set(path.name, count)
        unreachable = isinstance(error.cause, DestinationUnreachable)  # no association: not this report's fault
        if unreachable:
            self.down_until = time.monotonic() + self.retry_after
        log.warning("%s; kept in the spool, tried again in %.0f s%s", error, self.retry_after,
                    " with every report waiting (the destination is unreachable)" if unreachable else "")
        self._retry_later([path])

    def _set_aside(self, path: Path, reason: str):
        set_aside(path, self.unreadable, reason)  # first: the line below says where it is
        log.warning("instance %s: unreadable: %s (kept in %s)", uid_of(path), reason, display_path(self.unreadable))

    def _retry_later(self, paths, due: float | None = None):
        self.later.extend((due or time.monotonic() + self.retry_after, p) for p in paths)

