"""STOW-RS of one report (or overlay) into its study, and what the PACS's answer means: stored, already held
(0111: this very report), refused (a failure reason about this instance) or failed (tried again next run)."""
from __future__ import annotations

import logging

from .dicom_send import DUPLICATE as DUPLICATE_INSTANCE
from .dicomweb_session import stow_answer
from .network import TransferError

log = logging.getLogger("pneumonia_cnn")
STOW_NOTHING_STORED = {400, 409}  # the standard's answers when the PACS stored none of the instances sent


def stow(client, dataset, study_uid: str):
    import requests
    try:
        response = client.store_instances([dataset], study_instance_uid=study_uid)
    except requests.HTTPError as error:
        status = getattr(error.response, "status_code", None)
        answer = stow_answer(error.response) if status in STOW_NOTHING_STORED else None
        if not getattr(answer, "FailedSOPSequence", None):
            raise  # no reason given (a proxy's 400, say): a failure, tried again next run, never a refusal
        if _holds_this_report(answer, str(dataset.SOPInstanceUID)):
            return
        _refused(answer, f"HTTP {status}, ")
    uid = str(dataset.SOPInstanceUID)
    if not _names(response, uid) and not getattr(response, "FailedSOPSequence", None):
        kept = getattr(client, "last_post", {}).get("response")  # the answer as sent, read by its media type
        response = (stow_answer(kept) if kept is not None else None) or response
    if getattr(response, "FailedSOPSequence", None) and not _holds_this_report(response, uid):
        _refused(response)
    if getattr(response, "FailedSOPSequence", None):
        return
    if not _names(response, uid):
        # an empty or non-DICOM 200 (a proxy, a login page, a redirect that turned the POST into a GET) was
        # taken as stored, and the instance never reported; tried again, as any failure
        raise TransferError(f"the PACS's answer does not name {uid} among the instances it stored (no "
                            "ReferencedSOPSequence entry for it): not counted as stored")


def _holds_this_report(answer, uid: str) -> bool:
    """Failure reason 0111 (Duplicate SOP Instance) for the one instance each STOW-RS sends: a report's UID comes
    from its source instance, the model and the pixels scored (``dicom_sr.result_uid``), so the PACS holds this
    very report (as a C-STORE's 0111 is taken in ``dicom_send.stored``); it had been a refusal."""
    failed = getattr(answer, "FailedSOPSequence", None) or []
    held = bool(failed) and all(getattr(item, "FailureReason", None) == DUPLICATE_INSTANCE for item in failed)
    if held:
        log.info("%s: the PACS holds this very report already (failure reason 0x0111, Duplicate SOP Instance): "
                 "taken as stored", uid)
    return held


def _names(answer, uid: str) -> bool:
    return any(str(getattr(item, "ReferencedSOPInstanceUID", "")) == uid
               for item in getattr(answer, "ReferencedSOPSequence", None) or [])


def _refused(answer, status: str = ""):
    failed = getattr(answer, "FailedSOPSequence", None)
    reason = getattr(failed[0], "FailureReason", None) if failed else None
    error = TransferError(f"the PACS refused the instance ({status}failure reason "
                          f"{reason if reason is not None else '?'})")
    # A7xx: out of resources, worth retrying; any other reason is about this instance
    error.transient = isinstance(reason, int) and reason >> 8 == 0xA7
    error.refusal = not error.transient
    raise error
