"""Sending reports from ``listen`` to its destination: where (``--send-to HOST:PORT:AE_TITLE``) and how (one
association per batch, one C-STORE per report), with a refusal of a report told apart from a failure of the link.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from ..errors import PneumoniaCNNError
from .dicom_access import check_ae_title

log = logging.getLogger("pneumonia_cnn")
OUT_OF_RESOURCES = 0xA700
RESOURCE_LIMITATION = 0x0213  # a general status of the same meaning: busy now, not a verdict on the report
DUPLICATE = 0x0111  # "Duplicate SOP Instance": the destination holds an instance of this very UID already
# reports (SOP Instance UIDs) whose C-STORE this process sent and got no answer to: the destination may hold them
ANSWER_LOST: set[str] = set()


@dataclass(frozen=True)
class Destination:
    host: str
    port: int
    ae_title: str
    # seconds to wait for each C-STORE's answer (listen --answer-timeout): pynetdicom's 30 s gave up on a busy
    # PACS that then stored the report anyway, and the node sent it again every pass, holding every other report
    answer_timeout: float = 120.0

    @classmethod
    def parse(cls, text: str) -> Destination:
        parts = str(text).rsplit(":", 2)
        if len(parts) != 3 or not parts[0] or not parts[1].isdigit() or not 0 < int(parts[1]) < 65536:
            raise PneumoniaCNNError(f"--send-to {text}: expected HOST:PORT:AE_TITLE (e.g. pacs.local:104:PACS)")
        return cls(parts[0].strip("[]"), int(parts[1]), check_ae_title(parts[2], "--send-to"))

    def __str__(self):
        return f"{self.ae_title}@{self.host}:{self.port}"


class DestinationUnreachable(ConnectionError):
    """No association: the destination is down, unreachable or rejects this node, whatever report is sent (a
    C-STORE without an answer, or answered "busy", is about that report's transfer)."""


class ReportRefused(Exception):
    """The destination answered this report's C-STORE with a failure status: about this report, not the link."""
    refusal = True


def send_c_store(ae_title: str, destination: Destination, datasets, tls=None) -> None:
    """One association to ``destination`` (over TLS with ``tls``, an SSL context), one C-STORE per dataset; a
    refusal raises ReportRefused, a failure worth another try ConnectionError (which ``with_retries`` retries)."""
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE
    ae = AE(ae_title=ae_title)
    ae.dimse_timeout = destination.answer_timeout
    for sop_class in dict.fromkeys(str(d.SOPClassUID) for d in datasets):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    association = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                               tls_args=(tls, destination.host) if tls else None)
    if not association.is_established and association.rejected_contexts and not association.accepted_contexts:
        classes = ", ".join(sorted({str(c.abstract_syntax) for c in association.rejected_contexts}))
        raise ReportRefused(f"{destination} accepts no presentation context for SOP class {classes}")
    if association.is_rejected:  # "calling AE title not recognised": the node is not registered there
        answer = association.acceptor.primitive
        raise DestinationUnreachable(f"{destination} rejected the association ({answer.result_str}: "
                                     f"{answer.reason_str}; from the {answer.source_str})")
    if not association.is_established:
        raise DestinationUnreachable(f"association with {destination} was aborted or never connected")
    try:
        for dataset in datasets:
            status = association.send_c_store(dataset)
            code = getattr(status, "Status", None)
            if code is None:
                ANSWER_LOST.add(str(dataset.SOPInstanceUID))
            if code is None or code >> 8 == OUT_OF_RESOURCES >> 8 or code == RESOURCE_LIMITATION:  # no answer,
                # or busy: worth trying again (0213 had counted as a refusal, towards --give-up-after)
                raise ConnectionError(f"{destination} answered C-STORE with status "
                                      f"{'none (timeout or abort)' if code is None else f'0x{code:04X}'}")
            if not stored(code, destination, dataset):
                raise ReportRefused(f"{destination} refused the C-STORE of {dataset.Modality} "
                                    f"{dataset.SOPInstanceUID} with status 0x{code:04X}")
    finally:
        association.release()


def stored(code: int, destination: Destination, dataset) -> bool:
    """Whether a C-STORE status means the destination holds the instance: Success, or any status pynetdicom
    classes as a Warning (0001, 0107, 0116, Bxxx: stored, with a remark; each gets its line), or 0111
    (Duplicate SOP Instance): a report's UID comes from its source instance, the model and what it states
    (``dicom_sr.result_uid``), so the destination holds this very report: sent before with its answer lost, or by
    an earlier run. (Until 2026-11-28 the UID ignored the result, and a changed image re-sent under its old UID
    got another report under the same UID: 0111 was then refused.)"""
    from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, code_to_category
    category, uid = code_to_category(code), str(dataset.SOPInstanceUID)
    what = f"{destination}: {dataset.Modality} {uid}"
    if category == STATUS_WARNING:
        log.warning("%s stored with warning status 0x%04X (%s)", what, code, status_name(code))
    elif code == DUPLICATE and uid in ANSWER_LOST:
        log.info("%s with status 0x0111 (Duplicate SOP Instance): stored when its answer was lost: taken as "
                 "delivered", what)
    elif code == DUPLICATE:
        log.info("%s with status 0x0111 (Duplicate SOP Instance): the destination holds this very report (an "
                 "earlier run's: the same image, model and result): taken as delivered", what)
    delivered = category in (STATUS_SUCCESS, STATUS_WARNING) or code == DUPLICATE
    if delivered:
        ANSWER_LOST.discard(uid)
    return delivered


def status_name(code: int) -> str:
    from pynetdicom.status import GENERAL_STATUS, STORAGE_SERVICE_CLASS_STATUS
    return (STORAGE_SERVICE_CLASS_STATUS.get(code) or GENERAL_STATUS.get(code) or ("", "a warning"))[1]
