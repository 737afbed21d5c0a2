"""Retries with exponential back-off for network calls (DICOMweb, DICOM networking), and one-line reasons.

A network error is worth retrying (connection refused or reset, a timeout, a transfer cut short, a server
error); a refusal that will not change (HTTP 4xx other than 408/429, a malformed answer) is not.
"""
from __future__ import annotations

import logging
import re
import time

from ..errors import PneumoniaCNNError

log = logging.getLogger("pneumonia_cnn")
RETRIABLE_STATUS = {408, 429, 500, 502, 503, 504}


class TransferError(PneumoniaCNNError):
    """A network call that failed, after its retries when it was worth retrying: ``transient`` (trying again may
    succeed), ``status`` (the HTTP status, if any) and ``refusal`` (the peer refused this very item)."""
    transient: bool = True
    status: int | None = None
    refusal: bool = False
    cause: BaseException | None = None  # the error of the last try


def one_line(error: BaseException) -> str:
    """The error as one short line: its type, the HTTP status when there is one, and its first line; for a
    connection that failed, the reason at the bottom of it (refused, no such host, timed out), which requests
    puts last in a message longer than the line."""
    response = getattr(error, "response", None)
    status = f"HTTP {response.status_code} " if getattr(response, "status_code", None) else ""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    reason = getattr(error.args[0], "reason", None) if error.args else None  # urllib3's MaxRetryError
    if isinstance(reason, BaseException):
        text = re.sub(r"^<[^>]*>: ", "", str(reason))  # "<HTTPConnection object at 0x7f..>: Failed to ..."
    return f"{status}{type(error).__name__}" + (f": {text[:200]}" if text else "")


def is_transient(error: BaseException) -> bool:
    """Whether trying again may succeed."""
    import requests
    if isinstance(error, TransferError):
        return error.transient
    if isinstance(error, requests.HTTPError):
        status = getattr(error.response, "status_code", None)
        return status is None or status in RETRIABLE_STATUS
    return isinstance(error, (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                              requests.exceptions.ContentDecodingError, ConnectionError, TimeoutError, EOFError))


def with_retries(action, what: str, attempts: int = 4, backoff: float = 1.0, sleep=time.sleep):
    """``action()``, tried up to ``attempts`` times while it fails transiently, waiting backoff, 2 x backoff,
    4 x backoff... seconds between tries. Raises ``TransferError("WHAT: reason")`` at the end."""
    for attempt in range(1, max(1, attempts) + 1):
        try:
            return action()
        except Exception as error:  # noqa: BLE001 - classified right below; never swallowed
            transient = is_transient(error)
            if not transient or attempt >= attempts:
                tries = f" (after {attempt} attempts)" if attempt > 1 else ""
                failure = TransferError(f"{what}: {one_line(error)}{tries}")
                failure.transient = transient
                failure.status = getattr(getattr(error, "response", None), "status_code", None)
                failure.refusal = getattr(error, "refusal", False)  # the peer refused this very item
                failure.cause = error
                raise failure from None
            delay = backoff * 2 ** (attempt - 1)
            log.warning("%s: %s; retrying in %.1f s (attempt %d of %d)", what, one_line(error), delay, attempt + 1,
                        attempts)
            sleep(delay)
    raise AssertionError("unreachable")
