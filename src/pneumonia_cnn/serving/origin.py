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


def host_authority(host_header: str, scheme: str) -> tuple[str, int | None] | None:
    try:
        parts = urlsplit(f"//{host_header.strip()}")
        return authority(parts.hostname or "", parts.port, scheme)
    except ValueError:  # a port that is no number: not this server
        return None


def origin_authority(origin: str) -> tuple[str, int | None] | None:
    try:
        parts = urlsplit(origin.strip())
        if parts.scheme not in DEFAULT_PORTS or not parts.hostname:  # "null": a sandboxed frame, a file:// page
            return None
        return authority(parts.hostname, parts.port, parts.scheme)
    except ValueError:
        return None


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
        page = [origin_authority(origin) for origin in origins]
        if all(seen is not None and seen == host_authority(host, urlsplit(origin.strip()).scheme)
               for seen, origin in zip(page, origins)):
            return await self.app(scope, receive, send)
        shown = "".join(c if c.isprintable() else "?" for c in origins[0])[:100]
        return await refuse(scope, receive, send, 403, f"cross-origin request refused: a page of {shown!r} may "
                                                       f"not post to this server (its Host is {host[:100]!r})")
