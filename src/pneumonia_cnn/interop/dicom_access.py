"""Who may talk to the ``listen`` node, and how: the calling AE titles it accepts, the called AE title it answers
to, and DICOM TLS (PS3.15 Annex B) for the images it receives and the reports it sends.

AE titles are names the sender chooses, not credentials: on a hospital network they keep a misrouted modality
from having its images scored and reported; TLS with client certificates (``tls_ca``) is what authenticates.
"""
from __future__ import annotations

import contextlib
import logging
import re
import ssl
from dataclasses import dataclass

from ..errors import PneumoniaCNNError

log = logging.getLogger("pneumonia_cnn")

LOOPBACK = {"127.0.0.1", "::1", "localhost"}


@dataclass(frozen=True)
class NodeAccess:
    accept_from: tuple[str, ...] = ()  # calling AE titles accepted; empty: any
    tls_cert: str | None = None  # this node's certificate (PEM), for receiving and, with send_tls_ca, for sending
    tls_key: str | None = None
    tls_ca: str | None = None  # senders must present a certificate signed by this CA
    send_tls_ca: str | None = None  # the destination's certificate is verified against this CA; reports over TLS

    def __post_init__(self):
        for title in self.accept_from:
            check_ae_title(title, "--accept-from")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise PneumoniaCNNError("--tls-cert and --tls-key go together (the node's certificate and its key)")
        if self.tls_ca and not self.tls_cert:
            raise PneumoniaCNNError("--tls-ca needs --tls-cert and --tls-key: senders are verified over TLS only")
        self.server_context(), self.client_context()  # unreadable files: one line now, not at the first sender

    def server_context(self) -> ssl.SSLContext | None:
        if not self.tls_cert:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        _load(context.load_cert_chain, "--tls-cert/--tls-key", self.tls_cert, self.tls_key)
        if self.tls_ca:
            _load(context.load_verify_locations, "--tls-ca", self.tls_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def client_context(self) -> ssl.SSLContext | None:
        if not self.send_tls_ca:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the host; trusts this CA only, not the system's
        _load(context.load_verify_locations, "--send-tls-ca", self.send_tls_ca)
        if self.tls_cert:  # the destination may ask for ours
            _load(context.load_cert_chain, "--tls-cert/--tls-key", self.tls_cert, self.tls_key)
        return context

    def apply(self, ae) -> None:
        ae.require_called_aet = True  # an association addressed to another AE title was meant for another node
        ae.require_calling_aet = [title.strip() for title in self.accept_from]

    def exposure_warning(self, host: str) -> str | None:
        if host in LOOPBACK or self.accept_from or self.tls_ca:
            return None
        return (f"listening on {host} for any sender: give --accept-from with the AE titles of the PACS and "
                f"modalities that send here, or --tls-ca to accept only senders with a certificate")


def check_ae_title(title: str, option: str) -> str:
    """An AE title as DICOM allows it (1 to 16 printable ASCII characters other than backslash, not all
    spaces), or a one-line error naming the option: pynetdicom would refuse it only when it is first used."""
    if not 0 < len(title.strip()) <= 16 or not all(" " <= c <= "~" and c != "\\" for c in title):
        raise PneumoniaCNNError(f"{option} {title!r}: an AE title has 1 to 16 printable ASCII characters other "
                                f"than backslash, not all spaces")
    return title


HANDSHAKE_SECONDS = 10.0


def tls_handshake(context: ssl.SSLContext, event) -> None:
    """pynetdicom's EVT_CONN_OPEN handler, on the connection's own thread: the TLS handshake, within
    HANDSHAKE_SECONDS. Given the context, pynetdicom made it in its accept loop with no time limit, so one peer
    that connected and sent nothing held every other sender, and a stop, for as long as it stayed."""
    connection, raw = event.assoc.dul.socket, event.assoc.dul.socket.socket
    tls = None
    try:
        tls = context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        tls.settimeout(HANDSHAKE_SECONDS)
        tls.do_handshake()
        tls.settimeout(None)
        connection.socket = tls
    except (OSError, ValueError) as error:  # ssl.SSLError and timeouts are OSErrors
        reason = str(getattr(error, "reason", None) or error or "timed out")
        reason = re.sub(r"^_ssl\.c:\d+: | \(_ssl\.c:\d+\)$", "", reason)
        log.warning("connection from %s:%s: TLS handshake failed (%s): closed", event.address[0], event.address[1],
                    reason)
        if tls is not None:  # it took the raw socket's descriptor over
            with contextlib.suppress(OSError):
                tls.close()
        connection.close()  # the association ends as on any closed connection


def rejection_reason(association, accept_from) -> str:
    """Why the node rejected this association request, as one line."""
    request = getattr(association.requestor, "primitive", None)
    calling, called = association.requestor.ae_title, getattr(request, "called_ae_title", "?")
    if accept_from and calling not in [title.strip() for title in accept_from]:
        return f"calling AE title {calling} is not one of --accept-from ({', '.join(accept_from)})"
    if called != association.acceptor.ae_title.strip():
        return f"it called AE title {called}, and this node is {association.acceptor.ae_title.strip()}"
    return "too many associations at once, or no presentation context offered"


def _load(method, option: str, *files):
    from ..fileio import special_file
    special = next((f"{path}: {special_file(path)}" for path in files if path and special_file(path)), None)
    if special:  # OpenSSL would wait on a named pipe's writer for ever
        raise PneumoniaCNNError(f"{option} {' / '.join(files)}: not a regular file ({special})")
    try:
        method(*files)
    except (OSError, ssl.SSLError) as error:
        reason = re.sub(r" \(_ssl\.c:\d+\)$", "", str(getattr(error, "strerror", None) or error))
        raise PneumoniaCNNError(f"{option} {' / '.join(files)}: cannot load ({reason})") from None
