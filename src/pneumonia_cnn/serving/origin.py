"""Cross-site request forgery: a web page on another origin must not make a visitor's browser post to the server.

A browser sends a multipart POST to any address without asking first (a CORS "simple" request): without API
keys (the loopback default) any page a user opened could reload the model (which restarted drift monitoring)
and put predictions of its own images into the audit log and the drift window. Browsers name the page's origin
in the ``Origin`` header of every POST, so a POST whose ``Origin`` is not this server's own (scheme aside, the
host and port its ``Host`` header names) gets 403; one without ``Origin`` (curl, scripts, PACS gateways) is no
browser's and passes. A reverse proxy must pass the client's ``Host`` on (nginx: ``proxy_set_header Host
$http_host``), as the Host check needs anyway.
"""
from __future__ import annotations

from urllib.parse import urlsplit

from .auth import refuse

SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
DEFAULT_PORTS = {"http": 80, "https": 443}


def authority(host: str, port: int | None, scheme: str) -> tuple[str, int | None]:
    """(name, port), the name lower case without a trailing dot and IPv6 brackets, the scheme's port if none."""
    return host.lower().strip("[]").rstrip("."), port if port is not None else DEFAULT_PORTS.get(scheme)


def same_origin(origin: str, host_header: str) -> bool:
    """Whether a page of ``origin`` is this server, whose ``Host`` header is ``host_header`` ("null", a
    sandboxed frame's or a file:// page's, and a port that is no number are not)."""
    try:
        page, host = urlsplit(origin.strip()), urlsplit(f"//{host_header.strip()}")
        if page.scheme not in DEFAULT_PORTS or not page.hostname:
            return False
        return authority(page.hostname, page.port, page.scheme) == authority(host.hostname or "", host.port,
                                                                              page.scheme)
    except ValueError:
        return False


class SameOriginMiddleware:
    """ASGI: a POST (PUT, PATCH, DELETE) from a page of another origin gets 403 with the one-line JSON error."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in SAFE_METHODS:
            return await self.app(scope, receive, send)
        headers = scope["headers"]
        origins = [value.decode("latin-1") for name, value in headers if name == b"origin"]
        host = next((value.decode("latin-1") for name, value in headers if name == b"host"), "")
        if all(same_origin(origin, host) for origin in origins):
            return await self.app(scope, receive, send)
        shown = "".join(c if c.isprintable() else "?" for c in origins[0])[:100]
        return await refuse(scope, receive, send, 403, f"cross-origin request refused: a page of {shown!r} may "
                                                       f"not post to this server (its Host is {host[:100]!r})")
