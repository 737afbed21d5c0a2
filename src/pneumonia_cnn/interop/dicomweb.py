"""``pacs``: find new chest X-rays in a PACS with QIDO-RS, fetch them with WADO-RS, score them, and store the
report (and the optional Grad-CAM overlay) back into each image's study with STOW-RS (dicomweb-client).

Every network call is retried with exponential back-off; an instance whose transfer still fails is named on
one line, recorded as ``failed`` and tried again on the next run, while the others go on; one that the PACS
refuses itself (HTTP 404/410 for an instance it still lists, a STOW-RS failure reason for its report) in
``give_up_after`` runs, counted at most once per ``refusal_spacing`` seconds, is given up on, so that it does
not fail every run. The SQLite state
file remembers what each model has scored, so a rerun (or ``--watch``'s next poll) scores only new instances,
and report UIDs derived from the source instance make a repeated store replace rather than duplicate.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import time
from dataclasses import dataclass

from ..errors import PneumoniaCNNError
from ..signals import Stopped, StopSignals
from .arrival import decodable_transfer_syntaxes
from .dicomweb_session import AnswerTooLarge, connect
from .network import TransferError, with_retries
from .scoring import DicomScorer, ScoredInstance, not_an_xray, shown_uid
from .state import GIVEN_UP, ScoredState, StateFileError
from .stow import stow
from .uids import is_uid

log = logging.getLogger("pneumonia_cnn")
NOT_SCORED_CLASSES = {"1.2.840.10008.5.1.4.1.1.7"}  # secondary capture: overlays, screenshots
STUDY, SERIES, SOP, SOP_CLASS, MODALITY = "0020000D", "0020000E", "00080018", "00080016", "00080060"


@dataclass(frozen=True)
class PacsOptions:
    url: str
    state: str
    modalities: tuple[str, ...] = ("CR", "DX")
    study_date: str | None = None  # DICOM range: 20240101-20241231, 20240101-, -20241231 or one date
    overlay: bool = False
    batch_size: int = 16
    attempts: int = 4
    backoff: float = 1.0
    page_size: int = 200
    timeout: float = 60.0  # each wait (connecting, between bytes)
    answer_timeout: float = 600.0  # a whole answer, once it has begun
    user: str | None = None
    give_up_after: int = 3  # runs in which the PACS refused the instance itself
    refusal_spacing: float = 600.0  # refusals closer together count once: --watch polls must not give up in a minute
    retry_given_up: bool = False
    max_instance_mb: float = 256.0  # an answer above it is not read: the instance is unreadable, not fetched again


class PacsJob:
    def __init__(self, predictor, options: PacsOptions, client=None):
        self.options = options
        self.scorer = DicomScorer(predictor, overlay=options.overlay)
        self.model = self.scorer.model.key  # the model id and its decision
        self.client = client or connect(options.url, options.timeout, options.user, options.max_instance_mb,
                                        options.answer_timeout)
        self.state = ScoredState(options.state)
        self.stop = StopSignals()  # entered by watch(): a stop signal ends it after the instance in hand
        # called with each result once it is stored and recorded done: a run that ends early (SIGTERM, the state
        # file's disk full) has said each report it stored, which the next run counts as "already scored"
        self.on_stored = lambda result: None
        if options.retry_given_up:  # once, at the start: a --watch job keeps what it gives up on later
            retried = self.state.retry_given_up(self.model)
            if retried:
                log.info("%d instance(s) given up on earlier: tried again", retried)

    def _retry(self, action, what: str):
        return with_retries(action, what, self.options.attempts, self.options.backoff, self.stop.pause)

    def find_new(self) -> tuple[list[dict], int, int]:
        """QIDO-RS, one query per modality, page by page: (instances not yet scored by this model, how many
        were already scored, how many were given up on)."""
        finished, produced = self.state.finished(self.model), self.state.produced()
        given_up = self.state.finished(self.model, (GIVEN_UP,))
        found, seen, known, abandoned = [], set(), 0, 0
        for modality in self.options.modalities:
            filters = {"Modality": modality}
            if self.options.study_date:
                filters["StudyDate"] = self.options.study_date
            for record in self._search(filters):
                uid = _value(record, SOP)
                if not uid or uid in seen or uid in produced or _value(record, SOP_CLASS) in NOT_SCORED_CLASSES:
                    continue
                seen.add(uid)
                if uid in finished:
                    known += 1
                elif uid in given_up:
                    abandoned += 1
                else:
                    found.append(record)
        return found, known, abandoned

    def _search(self, filters: dict):
        """Page by page until an empty page: a PACS may answer fewer than the limit asked for (PS3.18; Orthanc's
        LimitFindInstances), so a short page is not the last (stopping there left the rest unscored for good)."""
        offset, seen, full = 0, set(), False
        what = f"{self.options.url}: QIDO-RS search {filters}"
        while True:
            page = self._retry(lambda skip=offset: self.client.search_for_instances(
                search_filters=filters, limit=self.options.page_size, offset=skip,
                fields=["StudyDate", "Modality", "SOPClassUID"]), what)
            if not isinstance(page, list):
                raise TransferError(f"{what}: the answer is not a list of instances ({type(page).__name__})")
            records = [r for r in page if isinstance(r, dict) and _value(r, SOP)]
            if page and not records:  # a login page's JSON, another API: not "nothing new", which cron never sees
                error = TransferError(f"{what}: the answer lists no instance ({len(page)} item(s), none with a SOP "
                                      "Instance UID): is --dicomweb the PACS's DICOMweb root?")
                error.transient = False
                raise error
            if len(records) < len(page):
                log.warning("%s: %d item(s) of the answer are not instances; left out", what, len(page) - len(records))
            new = [r for r in records if _value(r, SOP) not in seen]
            if not page:
                return
            if not new:  # nothing it had not listed already: it ignores the offset (or, rarely, as many instances
                # arrived meanwhile as a page holds): stop; the next run lists the rest
                if full:  # after a short page, a PACS that ignores the offset has listed everything already
                    log.warning("%s: the PACS answered offset %d with no instance it had not already listed (it "
                                "ignores paging, or a page's worth arrived meanwhile); stopped after %d, the rest on "
                                "the next run", what, offset, len(seen))
                return
            seen.update(_value(r, SOP) for r in new)
            yield from new
            full = len(page) >= self.options.page_size
            offset += len(page)

    def run_once(self) -> dict:
        """One pass: every new instance fetched, scored and reported; returns the counts of this pass."""
        new, known, given_up = self.find_new()
        summary = {"found": len(new), "already_scored": known, "scored": 0, "unreadable": 0, "failed": 0,
                   "skipped": 0, "given_up": 0, "given_up_before": given_up, "overlays_refused": 0, "results": [],
                   "left": 0,  # not fetched, or not stored: a stop signal came first, or the PACS went away
                   "unreachable": None}  # why the PACS is taken to be down (the rest left for the next run)
        size = max(1, self.options.batch_size)
        for start in range(0, len(new), size):
            self._process(new[start:start + size], summary)
        return summary

    def _process(self, records: list[dict], summary: dict):
        """Each result is named and recorded by the UIDs QIDO-RS listed it under, which the next run's search
        compares with (a corrupt answer was recorded as instance "?" and fetched again on every run)."""
        datasets, listed = [], []
        for record in records:
            if self.stop or summary["unreachable"]:  # those fetched are scored and stored (unless the PACS went
                summary["left"] += 1  # away); the rest are new to the next run
                continue
            study, series, sop = _value(record, STUDY), _value(record, SERIES), _value(record, SOP)
            reason = listing_problem(study, series, sop)
            if reason:  # nothing to fetch it by until the PACS lists it whole and valid: given up, which
                # --retry-given-up undoes, rather than failing on every run
                log.warning("instance %s: %s (given up; --retry-given-up fetches it again)", shown_uid(sop), reason)
                self.state.record(sop, self.model, GIVEN_UP, study, series, error=reason)
                summary["given_up"] += 1
                continue
            try:
                dataset = self._fetch(study, series, sop)
            except TransferError as error:  # 404/410: listed by QIDO-RS but not there
                if isinstance(error.cause, AnswerTooLarge):  # it will not shrink: given up until the limit is
                    # raised and --retry-given-up fetches it again
                    log.warning("instance %s: %s (given up; a larger --max-instance-mb with --retry-given-up "
                                "fetches it again)", sop, error.cause)
                    self.state.record(sop, self.model, GIVEN_UP, study, series, error=str(error.cause))
                    summary["given_up"] += 1
                else:
                    self._failed(summary, sop, study, series, error, refused=error.status in (404, 410))
                continue
            fetched = str(getattr(dataset, "SOPInstanceUID", "") or "")
            if is_uid(fetched) and fetched != sop:  # it would be marked done with another instance's report
                self._failed(summary, sop, study, series, TransferError(
                    f"instance {sop}: WADO-RS answered with another instance ({shown_uid(fetched)})"), refused=True)
                continue
            reason = not_an_xray(dataset)
            if reason:
                log.info("instance %s: skipped (%s)", sop, reason)
                self.state.record(sop, self.model, "skipped", study, series, error=reason)
                summary["skipped"] += 1
                continue
            datasets.append(dataset), listed.append((sop, study, series))
        for result, (sop, study, series) in zip(self.scorer.score(datasets) if datasets else [], listed):
            if result.error:
                log.warning("instance %s: unreadable: %s", sop, result.error)
                self.state.record(sop, self.model, "unreadable", study, series, error=result.error)
                summary["unreadable"] += 1
            elif summary["unreachable"]:
                summary["left"] += 1
            else:
                result.sop_instance_uid = sop  # its report is already built, from the instance's own UIDs
                self._store(result, summary)

    def _fetch(self, study: str, series: str, sop: str):
        """WADO-RS, as the PACS stores the instance; one in a transfer syntax this installation cannot decode
        (12-bit JPEG Extended) is asked for again in Explicit VR Little Endian, which a PACS that converts
        (Orthanc does) sends decoded; from one that refuses to (a 4xx), the first is kept and the reader says
        why."""
        from pydicom.uid import ExplicitVRLittleEndian
        dataset = self._retry(lambda: self.client.retrieve_instance(study, series, sop), f"instance {sop}: WADO-RS "
                              "retrieve")
        syntax = str(getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", "") or "")
        if not syntax or syntax in decodable_transfer_syntaxes():
            return dataset
        try:
            return self._retry(lambda: self.client.retrieve_instance(
                study, series, sop, media_types=(("application/dicom", ExplicitVRLittleEndian),)),
                f"instance {sop}: WADO-RS retrieve in Explicit VR Little Endian")
        except TransferError as error:
            if error.transient or isinstance(error.cause, AnswerTooLarge):  # a 503, or too large decoded: not
                raise  # "does not convert" (that made the instance unreadable for good): failed, or given up
            log.info("instance %s: the PACS does not convert it (%s)", sop, error)
            return dataset

    def _store(self, result: ScoredInstance, summary: dict):
        for index, output in enumerate(result.outputs):
            try:
                self._retry(lambda instance=output: stow(self.client, instance, result.study_instance_uid),
                            f"instance {result.sop_instance_uid}: STOW-RS of {output.Modality} {output.SOPInstanceUID}")
            except TransferError as error:
                if index == 0 or not error.refusal:  # the report, or a failure worth another run: all again
                    self._failed(summary, result.sop_instance_uid, result.study_instance_uid,
                                 result.series_instance_uid, error, refused=error.refusal)
                    return
                # the report is in the PACS, which refuses the optional overlay itself: done, and said so
                log.warning("%s (the report is stored; the overlay is not sent again)", error)
                result.overlay_refused = f"overlay refused: {error}"
                summary["overlays_refused"] += 1
        self.state.record(result.sop_instance_uid, self.model, "done", result.study_instance_uid,
                          result.series_instance_uid, result.entry, result.report_uid, result.overlay_uid,
                          error=result.overlay_refused or result.overlay_error)
        summary["scored"] += 1
        summary["results"].append(result)
        self.on_stored(result)

    def _failed(self, summary, sop, study, series, error: TransferError, refused: bool):
        """A transfer that failed after its retries: tried again next run, unless the PACS has now refused this
        very instance in ``give_up_after`` runs (``refused``; at most one per ``refusal_spacing`` seconds). Any
        other failure (the PACS down, overloaded or refusing everything: HTTP 401/403/5xx) never gives up and
        leaves the count as it was."""
        if not refused and pacs_unreachable(error) and not self._answers():  # each instance left would take its
            summary["unreachable"] = str(error)  # retries in turn (about 7 s each: two hours for 1,000): the pass
            log.warning("%s: the PACS is unreachable; this pass stops, the instances not yet stored are left for "
                        "the next run", error)  # stops here, said once
        count, counted_at = self.state.refusals(sop, self.model)
        now = time.time()
        if refused and (counted_at is None or now - counted_at >= self.options.refusal_spacing):
            count, counted_at = count + 1, now
        if refused and count >= self.options.give_up_after:
            log.warning("%s (refused in %d runs: given up; --retry-given-up fetches it again)", error, count)
            self.state.record(sop, self.model, GIVEN_UP, study, series, error=str(error),
                              refusals=(count, counted_at))
            summary["given_up"] += 1
            return
        so_far = f"refused in {count} run(s), given up at {self.options.give_up_after}; " if count else ""
        log.warning("%s (%swill be tried again on the next run)", error, so_far)
        self.state.record(sop, self.model, "failed", study, series, error=str(error), refusals=(count, counted_at))
        summary["failed"] += 1

    def _answers(self) -> bool:
        """Whether the PACS answers a search at all (once, no retries): one instance's failure (a proxy's 504 on
        one large instance, a slow conversion) is not the PACS down, and had stopped every pass at it."""
        try:
            self.client.search_for_instances(search_filters={"Modality": self.options.modalities[0]}, limit=1,
                                              fields=["SOPInstanceUID"])
            return True
        except Exception:  # noqa: BLE001 - whatever failed, the PACS did not answer
            return False

    def watch(self, interval: float, polls: int | None = None, report=lambda summary: None) -> str | None:
        """Poll every ``interval`` seconds (``polls`` times, or until SIGTERM or SIGINT). A PACS that is down is
        reported on one line and polled again; nothing found in the meantime is lost. A stop signal ends it
        between polls, or after the instances in hand are stored, with one line saying what is left; returns
        the signal's name (None when ``polls`` ran out). Before, SIGTERM killed it mid-poll with no word."""
        done, left = 0, 0
        with self.stop:
            while (polls is None or done < polls) and not self.stop:
                left = 0
                try:
                    summary = self.run_once()
                    report(summary)
                    left = summary["left"]
                except (TransferError, StateFileError) as error:  # the PACS down, the state file locked
                    log.warning("%s; polling again in %.0f s", error, interval)
                except Stopped:  # during a retry's back-off: what was not stored is tried again next run
                    left = None
                done += 1
                if not self.stop and (polls is None or done < polls):
                    with contextlib.suppress(Stopped):
                        self.stop.pause(interval)
        if self.stop:
            log.info("%s: %s", self.stop.signal, _stopped(left))
        stopped, self.stop = self.stop.signal, StopSignals()  # a later run_once() is not stopped before it starts
        return stopped


def pacs_unreachable(error: TransferError) -> bool:
    """A failure after retries that may say the PACS is down (``PacsJob._answers`` then asks): no connection, no
    answer in time, or a gateway's 502/503/504."""
    import requests
    return error.status in (502, 503, 504) or isinstance(error.cause, (requests.ConnectionError, requests.Timeout,
                                                                       ConnectionError, TimeoutError))


def _stopped(left: int | None) -> str:
    """What a stop signal left, in words: ``left`` instances listed and not fetched, None for a poll stopped
    while it waited to retry a transfer."""
    if left is None:
        return "stopped while waiting to try again; what this poll had not stored is tried again by the next run"
    if left:
        return f"stopped after the instances in hand; {left} new instance(s) left for the next run"
    return "stopped between polls; the next run scores what arrives meanwhile"


def listing_problem(study: str | None, series: str | None, sop: str) -> str | None:
    """Why an instance QIDO-RS listed cannot be fetched: a UID missing, or one that is not a UID (the WADO-RS
    URL cannot be built: a 300-character "UID" failed on every run, forever)."""
    for name, uid in (("study", study), ("series", series), ("SOP", sop)):
        if not uid:
            return f"QIDO-RS listed it without its {name} instance UID"
        if not is_uid(uid):
            return f"QIDO-RS listed it with a {name} instance UID that is not a UID ({shown_uid(uid)})"
    return None


def _value(record: dict, tag: str) -> str | None:
    """A DICOM JSON element's first value; a lone value not wrapped in a list is taken as it is."""
    element = record.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    first = values[0] if isinstance(values, list) and values else values
    if isinstance(first, bool) or not isinstance(first, (str, int)):
        return None  # a person name's object, a nested list, a flag: no UID or code
    return str(first).strip() or None


def check_date_range(value: str | None) -> str | None:
    """A DICOM date range (YYYYMMDD, YYYYMMDD-YYYYMMDD, YYYYMMDD-, -YYYYMMDD), or a one-line error."""
    if not value:
        return None
    parts = value.split("-")
    if len(parts) > 2 or not all(p == "" or (len(p) == 8 and p.isdigit()) for p in parts) or not any(parts):
        raise PneumoniaCNNError(f"--study-date {value}: give YYYYMMDD or a range YYYYMMDD-YYYYMMDD "
                                f"(either side may be left open)")
    for part in filter(None, parts):
        try:
            datetime.datetime.strptime(part, "%Y%m%d")
        except ValueError:
            raise PneumoniaCNNError(f"--study-date {value}: {part} is not a calendar date") from None
    if len(parts) == 2 and all(parts) and parts[0] > parts[1]:
        raise PneumoniaCNNError(f"--study-date {value}: the range ends before it starts")
    return value
