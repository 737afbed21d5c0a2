"""The HTTP side of ``pacs``: a DICOMweb client whose credentials never come from the command line and are
never shown, whose WADO-RS answers are bounded by ``--max-instance-mb``, and the reading of STOW-RS answers."""
from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from urllib.parse import urlsplit, urlunsplit

import requests

from ..errors import PneumoniaCNNError
from ..fileio import over_limit


def connect(url: str, timeout: float = 60.0, user: str | None = None, max_instance_mb: float = 256.0,
            answer_timeout: float = 600.0):
    """A DICOMweb client. Credentials never come from the command line (process lists show it): with ``user``
    the password is read from PNEUMONIA_CNN_DICOMWEB_PASSWORD; a bearer token from PNEUMONIA_CNN_DICOMWEB_TOKEN.
    HTTPS certificates are checked (a hospital CA: REQUESTS_CA_BUNDLE)."""
    from dicomweb_client.api import DICOMwebClient
    from requests import Session
    check_url(url)
    logging.getLogger("dicomweb_client").setLevel(logging.WARNING)  # it logs every request at INFO
    session = Session()
    password, token = os.environ.get("PNEUMONIA_CNN_DICOMWEB_PASSWORD"), os.environ.get("PNEUMONIA_CNN_DICOMWEB_TOKEN")
    if user:
        if password is None:
            raise PneumoniaCNNError(f"--user {user}: set the password in PNEUMONIA_CNN_DICOMWEB_PASSWORD")
        session.auth = (user, password)
    elif password is not None:  # it would be sent to nobody, and the PACS's 401 would not say why
        raise PneumoniaCNNError("PNEUMONIA_CNN_DICOMWEB_PASSWORD is set but --user is not: name the user")
    if token:  # blank is refused by bearer_token, not quietly left out
        session.headers["Authorization"] = f"Bearer {bearer_token(token)}"
    session.hooks["response"].append(body_limit(int(max_instance_mb * 2**20)))
    session.hooks["response"].append(answer_deadline(answer_timeout))
    last_post: dict = {}

    def keep_post(response, *args, **kwargs):  # dicomweb-client reads a STOW-RS answer only when its
        if response.request.method == "POST":  # Content-Type is bare ("...; charset=utf-8" came back empty)
            last_post["response"] = response
        return response
    session.hooks["response"].append(keep_post)
    client = DICOMwebClient(url=url.rstrip("/"), session=session, timeout=timeout)
    client.last_post = last_post
    client.set_http_retry_params(retry=False)  # its own retries would multiply ours and hide each failure
    return client


def check_url(url: str) -> str:
    """``url`` (--dicomweb), refused with one line when it holds credentials (``http://user:password@pacs/...``):
    requests sent them, and the URL, password included, was then printed in every error line and every
    ``--watch`` poll's warning. Refused rather than redacted, as a hospital engineer expects: a password on the
    command line is also in the process list, the shell's history and the cron line or unit file that runs the
    job, and redacting our own lines hides none of those. --user with PNEUMONIA_CNN_DICOMWEB_PASSWORD (or a
    token in PNEUMONIA_CNN_DICOMWEB_TOKEN) keeps it in the environment; the refusal shows neither user nor
    password."""
    try:
        parts = urlsplit(url)
    except ValueError as error:  # "Invalid IPv6 URL": the URL itself is not repeated (it may hold a password)
        raise PneumoniaCNNError(f"--dicomweb: not a URL ({error})") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:  # "http:user:password@host" is no URL,
        # and dicomweb-client's "Malformed URL" error repeated it, password included
        raise PneumoniaCNNError("--dicomweb: not an http:// or https:// URL with a host (not repeated here: it may "
                                "hold a password)")
    if "@" in parts.netloc:
        shown = urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))
        raise PneumoniaCNNError(f"--dicomweb {shown}: credentials in the URL are refused (process lists and logs "
                                "show them): give the user with --user and the password in "
                                "PNEUMONIA_CNN_DICOMWEB_PASSWORD, or a bearer token in PNEUMONIA_CNN_DICOMWEB_TOKEN")
    return url


class AnswerTooLarge(PneumoniaCNNError):
    """An HTTP answer longer than --max-instance-mb: not read further (dicomweb-client holds a whole answer in
    memory, and decoding it took 10 times its size: a 98 MB instance, 976 MB of the process)."""


def body_limit(limit: int):
    """A requests response hook refusing a WADO-RS instance above ``limit`` bytes: by its Content-Length before
    any of it is read, or, sent in chunks, once that many bytes have arrived (searches and STOW-RS answers are
    not instances, and stay unbounded)."""
    def check(response, *args, **kwargs):
        if "/instances/" not in urlsplit(response.url or "").path:
            return response
        length = response.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > limit:
            response.close()
            raise AnswerTooLarge(f"{over_limit(int(length), limit / 2**20)} "
                                 "(--max-instance-mb)")
        stream = getattr(response.raw, "stream", None)
        if stream is None:  # not urllib3's response (another transport adapter): its Content-Length alone
            return response

        def bounded(*args, **kwargs):
            received = 0
            for chunk in stream(*args, **kwargs):
                received += len(chunk)
                if received > limit:
                    response.close()
                    raise AnswerTooLarge(f"more than {limit / 2**20:g} MB (--max-instance-mb)")
                yield chunk
        response.raw.stream = bounded
        return response
    return check


def answer_deadline(seconds: float):
    """A requests response hook giving up an answer not read whole ``seconds`` after its headers arrived
    (``--answer-timeout``): requests' own timeout bounds each wait between bytes only, so a PACS sending a byte
    every 2 s held a job for good. While the body is read, a timer shuts the connection's socket down at the
    deadline, which ends a read blocked on it (a check between reads alone waited for a whole 10 KiB block:
    10 s for a 1 s limit); the read's error, or its early end, becomes requests.Timeout."""
    def check(response, *args, **kwargs):
        stream, sock = getattr(response.raw, "stream", None), _socket_of(response)
        if stream is None or sock is None:  # another transport adapter
            return response
        deadline, pooled = time.monotonic() + seconds, getattr(response.raw, "connection", None) is not None

        def bounded(*args, **kwargs):
            expired = threading.Event()

            def expire():
                if pooled and getattr(response.raw, "connection", None) is None:
                    return  # read whole and handed back to the pool (a consumer that stopped at the last chunk)
                expired.set()
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:  # closed meanwhile
                    pass
            # only while the body is read, and never once urllib3 has handed the connection back to the pool
            timer = threading.Timer(max(0.0, deadline - time.monotonic()), expire)
            timer.daemon = True
            timer.start()
            try:
                yield from stream(*args, **kwargs)
            except Exception:
                if not expired.is_set():
                    raise
            finally:
                timer.cancel()
            if expired.is_set():  # raised above, or ended early as if complete (an answer without a length)
                response.close()
                raise requests.Timeout(f"the answer was not complete {seconds:g} s after it began "
                                       "(--answer-timeout)")
        response.raw.stream = bounded
        return response
    return check


def _socket_of(response):
    """The socket an answer is read from: urllib3's connection's, or, for an answer that ends when the
    connection closes (http.client has let go of the connection then), its file's."""
    sock = getattr(getattr(response.raw, "connection", None), "sock", None)
    if sock is None:
        fp = getattr(getattr(response.raw, "_fp", None), "fp", None)
        sock = getattr(getattr(fp, "raw", None), "_sock", None)
    return sock


def bearer_token(token: str) -> str:
    """The token without the line ending a file read into the variable leaves; refused, without being shown,
    when it holds characters a bearer token cannot (RFC 6750: letters, digits and -._~+/ then =): requests
    would otherwise quote the whole header, token included, in its error."""
    token = token.strip()
    if not re.fullmatch(r"[A-Za-z0-9\-._~+/]+=*", token):
        raise PneumoniaCNNError(f"PNEUMONIA_CNN_DICOMWEB_TOKEN: not a bearer token ({len(token)} characters, "
                                "some of them spaces, control characters or others a token cannot hold)")
    return token


def stow_answer(response):
    """The STOW-RS answer's dataset (its FailedSOPSequence says why), or None when it holds none. DICOM JSON, or
    the Native DICOM Model's XML (PS3.19), which a PACS may answer in."""
    import pydicom
    kind = response.headers.get("Content-Type", "")
    try:
        if "json" in kind:
            return pydicom.Dataset.from_json(response.content)
        return _failure_from_xml(response.content) if "xml" in kind else None
    except Exception:  # noqa: BLE001 - a refusal with an unreadable body is still a refusal
        return None


def _failure_from_xml(content: bytes):
    """The FailedSOPSequence's failure reasons from a Native DICOM Model answer (only what a refusal needs; the
    standard's elements carry no keyword that must be trusted). Python's expat refuses entity expansion bombs."""
    from xml.etree import ElementTree

    import pydicom
    root = ElementTree.fromstring(content)
    answer = pydicom.Dataset()
    failed = root.find("{*}DicomAttribute[@tag='00081198']")
    if failed is not None:
        items = []
        for item in failed.findall("{*}Item"):
            entry, value = pydicom.Dataset(), item.find("{*}DicomAttribute[@tag='00081197']/{*}Value")
            if value is not None and (value.text or "").strip().isdigit():
                entry.FailureReason = int(value.text.strip())
            items.append(entry)
        answer.FailedSOPSequence = items
    stored = root.find("{*}DicomAttribute[@tag='00081199']")  # ReferencedSOPSequence: what was stored
    if stored is not None:
        answer.ReferencedSOPSequence = [_referenced(item) for item in stored.findall("{*}Item")]
    return answer


def _referenced(item):
    import pydicom
    entry, value = pydicom.Dataset(), item.find("{*}DicomAttribute[@tag='00081155']/{*}Value")
    entry.ReferencedSOPInstanceUID = (value.text or "").strip() if value is not None else ""
    return entry
