"""Limits enforced while bytes arrive: body size, body time, requests admitted at once, idle connections.

``LimitsMiddleware`` wraps the ASGI ``receive`` of every upload: it counts the bytes as they come (chunked
bodies included, whatever ``Content-Length`` says) and answers 413 the moment the count passes the limit;
it gives the whole body ``body_timeout`` seconds (a stalled or trickling body gets 408), and after the first
``BODY_RATE_GRACE`` seconds the body must have come at ``MIN_BODY_RATE`` on average (408 too: 64 uploads trickling
a byte a second held every admission slot for the whole time-out, and every other upload got 503); it refuses a
compressed body (415: ``Content-Encoding`` is not decoded, so a gzip body was parsed as if it were plain); and it
admits at most ``max_in_flight`` requests with an upload at once, of which at most ``max_batches_in_flight``
batches, from the first byte of the body to the answer (decoded and scored images are held that long), which
bounds the memory uploads can take to about ``max_in_flight`` times the size limit plus ``max_batches_in_flight``
times the batch limit. A request beyond those waits up to ``admission_wait`` seconds for a place, its body not
yet read, then gets 503 with ``Retry-After``: refused at once, three clients sending batches of two small images
had 35 of 60 refused while the server was only scoring. At most ``max_in_flight`` wait; more get 503 at once.
Errors close the connection, since the rest of the body is never read.

``idle_timeout_protocol`` is uvicorn's h11 protocol with one more timer: a connection that has not sent a
whole request head within ``seconds`` (after it opened, or after its last response) is closed, so neither
an idle nor a slowly written request head can hold a connection. And it closes a connection whose client is
still sending a refused body the way web servers do ("lingering close"): the answer is sent, the server's
side shut, and what still arrives is read and dropped for up to ``LINGER_SECONDS`` (ended by a second of
silence) before the socket closes.
Closed at once, a socket with unread bytes resets the connection, and the reset destroys the answer before a
client that sends its whole body first (httpx, aiohttp) has read it: it saw a reset, not the 401, 413 or 503.
"""
from __future__ import annotations

import asyncio
import time

from .auth import SECURITY_HEADERS, refuse

LINGER_SECONDS, LINGER_SILENCE = 10.0, 1.0
BODY_RATE_GRACE, MIN_BODY_RATE = 5.0, 1024  # seconds, then bytes per second on average (Apache's mod_reqtimeout)


def http_error(status: int, detail: str, headers: dict | None = None):
    """Raised inside ``receive``: FastAPI passes an HTTPException raised while it reads a body through."""
    from fastapi import HTTPException
    return HTTPException(status, detail, headers={"Connection": "close", **(headers or {})})


class LimitsMiddleware:
    def __init__(self, app, body_limit, body_timeout: float, max_in_flight: int, on_reject=None,
                 batch_paths=(), max_batches_in_flight: int = 2, describe_limit=None, admission_wait: float = 0.0):
        """``body_limit(path) -> bytes``; ``describe_limit(path) -> str`` says it in the operator's terms;
        ``on_reject(path, reason)`` counts refusals for /metrics. Uploads to ``batch_paths`` (many files, a far
        larger body limit) are also limited to ``max_batches_in_flight``."""
        self.app, self.body_limit, self.body_timeout = app, body_limit, float(body_timeout)
        self.describe_limit = describe_limit or (lambda path: f"the limit is {body_limit(path):,} bytes")
        self.max_in_flight, self.in_flight = int(max_in_flight), 0
        self.batch_paths, self.max_batches, self.batches = frozenset(batch_paths), int(max_batches_in_flight), 0
        self.on_reject = on_reject or (lambda path, reason: None)
        self.admission_wait, self.waiting = float(admission_wait), set()  # futures woken when a place frees
        # at most as many waiting as may be admitted: each waiting connection may hold what the server reads ahead
        # of the app (h11: up to 64 KiB), so an unbounded queue would be unbounded memory
        self.max_waiting = self.max_in_flight

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        path, limit = scope["path"], self.body_limit(scope["path"])
        encoding = encoded_as(scope["headers"])
        if encoding:
            self.on_reject(path, "encoded")
            return await refuse(scope, receive, send, 415, f"Content-Encoding {encoding[:40]!r} is not accepted: "
                                                           f"send the upload uncompressed")
        declared = content_length(scope["headers"])
        if declared is not None and declared > limit:
            self.on_reject(path, "too_large")
            return await refuse(scope, receive, send, 413, f"upload too large: {declared:,} bytes declared; "
                                                           f"{self.describe_limit(path)}")
        batch = path in self.batch_paths
        if not await self._admitted(batch):
            self.on_reject(path, "busy")
            what = f"{self.batches} batch request(s)" if batch and self.batches >= self.max_batches else \
                f"{self.in_flight} request(s) with uploads"
            return await refuse(scope, receive, send, 503, f"busy: {what} in progress (waited "
                                                           f"{self.admission_wait:g} s); retry in a second",
                                {"Retry-After": "1"})
        try:
            await self.app(scope, self._guarded(receive, path, limit), send)
        finally:
            self.in_flight, self.batches = self.in_flight - 1, self.batches - batch
            for waiter in self.waiting:  # each waiter checks again; those still without a place wait on
                if not waiter.done():
                    waiter.set_result(None)

    def _full(self, batch: bool) -> bool:
        return self.in_flight >= self.max_in_flight or (batch and self.batches >= self.max_batches)

    async def _admitted(self, batch: bool) -> bool:
        """Take a place, waiting up to ``admission_wait`` seconds for one; False if none came. One event loop
        runs every request, so nothing else runs between the check and the count."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.admission_wait
        while self._full(batch):
            if loop.time() >= deadline or len(self.waiting) >= self.max_waiting:
                return False
            waiter = loop.create_future()
            self.waiting.add(waiter)
            try:
                await asyncio.wait_for(waiter, deadline - loop.time())
            except asyncio.TimeoutError:
                pass
            finally:
                self.waiting.discard(waiter)
        self.in_flight, self.batches = self.in_flight + 1, self.batches + batch
        return True

    def _guarded(self, receive, path: str, limit: int):
        start = time.monotonic()
        deadline = start + self.body_timeout
        received, finished = 0, False

        async def guarded_receive():
            nonlocal received, finished
            if finished:  # after the body only a disconnect can come; waiting for it is not a stall
                return await receive()
            by_rate = start + BODY_RATE_GRACE + received / MIN_BODY_RATE  # each byte that comes buys time
            try:
                message = await asyncio.wait_for(receive(), max(min(deadline, by_rate) - time.monotonic(), 0.001))
            except asyncio.TimeoutError:
                self.on_reject(path, "timeout")
                if by_rate < deadline:
                    raise http_error(408, f"request body arriving too slowly ({received:,} bytes in "
                                          f"{time.monotonic() - start:.0f} s; at least {MIN_BODY_RATE:,} bytes/s "
                                          f"after the first {BODY_RATE_GRACE:g} s)") from None
                raise http_error(408, f"request body not received within {self.body_timeout:g} s") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                finished = not message.get("more_body", False)
                if received > limit:
                    self.on_reject(path, "too_large")
                    raise http_error(413, f"upload too large; {self.describe_limit(path)}")
            return message
        return guarded_receive


def encoded_as(headers) -> str:
    """The codings of every Content-Encoding header but ``identity`` (a proxy may add ``identity``), "" if none."""
    codings = [token.strip().lower() for name, value in headers if name == b"content-encoding"
               for token in value.decode("latin-1").split(",")]
    return ", ".join(coding for coding in codings if coding not in ("", "identity"))


def content_length(headers) -> int | None:
    value = next((value for name, value in headers if name == b"content-length"), None)
    try:
        return None if value is None else int(value)
    except ValueError:
        return None


def idle_timeout_protocol(seconds: float, on_malformed=None):
    """uvicorn's h11 protocol, closing connections that send no complete request head for ``seconds``, and
    refusing a request malformed at the HTTP level with the API's one-line JSON instead of plain text;
    ``on_malformed()`` counts each (such a request never reaches the app and its metrics)."""
    import json

    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class IdleTimeoutH11Protocol(LingeringClose, H11Protocol):
        head_timeout = float(seconds)
        _head_timer = None

        def connection_made(self, transport):
            super().connection_made(LingeringTransport(transport, self))
            self._arm_head_timer()

        def on_response_complete(self):
            super().on_response_complete()
            self._arm_head_timer()

        def connection_lost(self, exc):
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

        def send_400_response(self, msg: str):
            if on_malformed is not None:
                on_malformed()
            body = json.dumps({"detail": "invalid HTTP request: a malformed request line, header or length"}).encode()
            head = h11.Response(status_code=400, reason=b"Bad Request", headers=[
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"), *SECURITY_HEADERS])
            for event in (head, h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

        def _arm_head_timer(self):
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(self.head_timeout, self._close_if_no_request)

        def _close_if_no_request(self):
            self._head_timer = None
            in_request = self.cycle is not None and not self.cycle.response_complete
            if not in_request and not self.transport.is_closing():
                self.transport.close()  # bodies in progress are the middleware's to time out

    return IdleTimeoutH11Protocol


def handshake_limited_server(config, seconds: float):
    """uvicorn's server, its TLS handshakes limited to ``seconds`` (asyncio's default is 60 s, and the head
    timer above starts only once the handshake is done: a client that connected and said nothing held a
    connection for a minute)."""
    import functools

    import uvicorn

    class HandshakeLimitedServer(uvicorn.Server):
        async def startup(self, sockets=None):
            if self.config.ssl is None:  # asyncio refuses a handshake time-out without TLS
                return await super().startup(sockets)
            loop = asyncio.get_running_loop()
            loop.create_server = functools.partial(type(loop).create_server, loop, ssl_handshake_timeout=seconds)
            try:
                await super().startup(sockets)
            finally:
                del loop.create_server  # the loop's own method again
    return HandshakeLimitedServer(config)


class LingeringClose:
    """For uvicorn's h11 protocol: close a connection whose client is still sending a request body only after
    answering it (see the module's docstring). As nginx's lingering close: at most ``LINGER_SECONDS`` in all,
    and ``LINGER_SILENCE`` seconds without a byte end it (a stalled body's client, answered 408, sends none)."""
    lingering, _linger_timer, _linger_deadline = False, None, 0.0

    def data_received(self, data):
        if not self.lingering:
            return super().data_received(data)
        self._arm_linger_timer()  # what arrives is the refused body: dropped

    def _arm_linger_timer(self):
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        wait = min(LINGER_SILENCE, self._linger_deadline - self.loop.time())
        self._linger_timer = self.loop.call_later(max(wait, 0), self._lingering_transport.close)

    def close_gently(self, transport):
        """Close ``transport``, or, while the client is still sending a request body, answer it first: shut
        the sending side and drop what arrives until the client closes or ``LINGER_SECONDS`` pass."""
        import h11
        if self.lingering or transport.is_closing():
            return
        if self.conn.their_state is not h11.SEND_BODY:
            return transport.close()
        if transport.can_write_eof():  # TLS cannot half-close: its answer is simply left to be read
            try:
                transport.write_eof()
            except OSError:  # the client reset the connection meanwhile: nothing left to linger for
                return transport.close()
        self.lingering, self._lingering_transport = True, transport
        transport.resume_reading()
        self._linger_deadline = self.loop.time() + LINGER_SECONDS
        self._arm_linger_timer()

    def connection_lost(self, exc):
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        super().connection_lost(exc)


class LingeringTransport:
    """The connection's transport as uvicorn sees it: ``close()`` goes through the protocol's lingering close,
    and a lingering connection reads as closing, so nothing more is written to it."""

    def __init__(self, transport, protocol):
        self._transport, self._protocol = transport, protocol

    def __getattr__(self, name):
        return getattr(self._transport, name)

    def close(self):
        self._protocol.close_gently(self._transport)

    def is_closing(self):
        return self._protocol.lingering or self._transport.is_closing()
