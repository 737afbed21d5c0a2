"""FastAPI app: ``POST /predict``, ``POST /predict/batch``, ``GET /health``, ``GET /model``, ``GET /metrics``,
``POST /admin/reload``, the web page at ``/`` (with ``/page.js`` and ``/page.css``) and the API's description
at ``/openapi.json``. No ``/docs``: FastAPI's Swagger page loads its script from a CDN, blank on a network
without the internet, and a third party's script on the page's origin, where the page keeps the API key.

No ``from __future__ import annotations`` here: FastAPI must resolve the endpoint parameter types.

Around the routes, outermost first: the security headers of every answer, request metrics, the Host check
(400), the same-origin check of POSTs from browsers (403), API keys (401/403), then the limits on uploads (413 while bytes arrive, 408 for a stalled or too slow
body, 415 for a compressed one, 503 when too many are in progress).
Uploads stay in memory (bounded by those limits), are decoded by content and never saved under the
client's name. The rest is in ``service.py``.
"""

import asyncio
import ipaddress
import logging
import os
import signal
import socket
import threading
from contextlib import asynccontextmanager
from importlib import resources

from ..errors import PneumoniaCNNError
from ..fileio import special_file
from ..inference.sessions import IDLE_THREADS, idle_threads
from .auth import ANY_IP_ADDRESS, SECURITY_HEADERS, AccessMiddleware, HostCheckMiddleware
from .limits import LimitsMiddleware, handshake_limited_server, idle_timeout_protocol
from .metrics import RequestMetricsMiddleware
from .origin import SameOriginMiddleware
from .service import RequestError, ServeOptions, Service

log = logging.getLogger(__name__)
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


WILDCARD_ADDRESSES = ("0.0.0.0", "::", "[::]")


def allowed_host_names(host: str, extra=()) -> list[str]:
    """Host headers the server answers: loopback names, the bound address, the machine's names and any IP
    address when bound to every address, and ``--allowed-hosts``. Anything else (a DNS-rebinding page's name)
    gets 400. A rebinding page is reached by a name its attacker controls, never by an address, so addresses
    are safe to answer: a load balancer's or Kubernetes' probe sends the node's address as Host, which a
    wildcard bind cannot list (it got 400 on /health, and the node never counted as healthy)."""
    bound = f"[{host}]" if ":" in host and not host.startswith("[") else host  # an IPv6 address as Host sends it
    names = list(LOOPBACK_NAMES) + [host, bound] + [name for name in extra if name]
    if host in WILDCARD_ADDRESSES:
        names += [socket.gethostname(), socket.getfqdn(), ANY_IP_ADDRESS]
    return sorted(set(names))


class SecurityHeadersMiddleware:
    """ASGI: ``SECURITY_HEADERS`` on every answer, refusals included, unless the answer sets one itself."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                message = {**message, "headers": headers + [h for h in SECURITY_HEADERS if h[0] not in present]}
            await send(message)
        return await self.app(scope, receive, send_with_headers)


def create_app(checkpoint, options: ServeOptions | None = None, allowed_hosts=None):
    from fastapi import FastAPI
    from starlette.formparsers import MultiPartParser

    from .forms import upload_route

    options = options or ServeOptions()
    service = Service(checkpoint, options)
    # Starlette spools parts over 1 MB to a temporary file; keep them in memory, which the size limits and
    # the admission limit bound, so that nothing an upload carries is written to disk.
    MultiPartParser.spool_max_size = max(MultiPartParser.spool_max_size, options.body_limit("/predict/batch") + 1)

    @asynccontextmanager
    async def lifespan(_app):
        await service.start()
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(service.reload("SIGHUP")))
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no SIGHUP here
            log.debug("SIGHUP reload not available in this process")
        yield
        await service.stop()

    app = FastAPI(title="pneumonia-cnn", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Pneumonia probability for a chest X-ray (image or DICOM). Research use only: "
                              "not a medical device.")
    add_error_handlers(app)
    app.router.route_class = upload_route(options.max_batch_files)  # its query checked, its form read by the server
    add_routes(app, service, options)
    app.add_middleware(LimitsMiddleware, body_limit=options.body_limit, body_timeout=options.body_timeout,
                       max_in_flight=options.max_in_flight, batch_paths=("/predict/batch",),
                       max_batches_in_flight=options.max_batches_in_flight, describe_limit=options.describe_limit,
                       admission_wait=options.admission_wait,
                       on_reject=lambda path, reason: service.metrics.rejected.labels(reason).inc())
    app.add_middleware(AccessMiddleware, keyring=lambda: service.keyring, executor=service.auth_executor)
    app.add_middleware(SameOriginMiddleware)  # inside the Host check: a foreign page's POST gets 403
    app.add_middleware(HostCheckMiddleware, allowed_hosts=list(allowed_hosts or allowed_host_names("127.0.0.1")))
    app.add_middleware(RequestMetricsMiddleware, metrics=service.metrics)
    app.add_middleware(SecurityHeadersMiddleware)  # added last: the outermost
    app.state.service = service
    return app


def add_error_handlers(app):
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.requests import ClientDisconnect

    @app.exception_handler(RequestError)
    async def request_error(_request, error: RequestError):
        return JSONResponse({"detail": error.detail}, status_code=error.status, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request, error: RequestValidationError):
        return JSONResponse({"detail": validation_message(error.errors())}, status_code=400)

    @app.exception_handler(ClientDisconnect)
    async def client_left(request, _error):
        """A client gone while its body was read (wherever it is read) is a 499, not an internal error: no log
        line above debug, no traceback (read_form makes it ``ClientGone``; this is for any other reader)."""
        log.debug("%s %s: the client left during its upload (499)", request.method, request.url.path)
        return JSONResponse({"detail": "the client closed the request"}, status_code=499)

    @app.exception_handler(Exception)
    async def internal_error(request, error: Exception):
        """One line for the client; the traceback goes to the server's log (uvicorn logs what is re-raised).
        Starlette answers this outside every middleware, so the security headers are set here too."""
        log.error("%s %s failed: %s: %s", request.method, request.url.path, type(error).__name__, error)
        return JSONResponse({"detail": f"internal error ({type(error).__name__}); the server log has the details"},
                            status_code=500, headers={key.decode(): value.decode() for key, value in SECURITY_HEADERS})


def validation_message(errors) -> str:
    """FastAPI's list of validation errors as one line: a missing upload says how to send one."""
    parts = []
    for error in errors:
        where, name = (list(error.get("loc", ())) + ["request", "?"])[:2]
        if where == "body" and error.get("type") == "missing":
            parts.append(f"no multipart field '{name}': send the image(s) as multipart/form-data field '{name}'")
        elif where == "body" and "Expected UploadFile" in str(error.get("msg")):
            parts.append(f"field '{name}' is text, not a file: send the image as a file in multipart/form-data "
                         f"field '{name}' (curl -F {name}=@chest.jpeg)")
        else:
            kind = "field" if where == "body" else f"{where} parameter"
            parts.append(f"{kind} '{name}': {' '.join(str(error.get('msg', 'invalid')).split())}")
    return "; ".join(parts) or "invalid request"


async def set_when_disconnected(request, gone) -> None:
    """Set ``gone`` when the client closes the connection: once the body is read, the next ASGI message is
    the disconnect (or the end of the response, when this waiter is cancelled)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    gone.set()


def static_file(name: str, media_type: str):
    async def serve_file():
        from fastapi.responses import Response
        text = resources.files("pneumonia_cnn.serving").joinpath(f"static/{name}").read_text(encoding="utf-8")
        return Response(text, media_type=media_type)
    return serve_file


def check_form_fields(form, expected: str) -> None:
    """Only ``expected`` file fields: another field was ignored in silence (``gradcam=true`` sent in the form
    gave no heat map; a ``files`` field sent to /predict was dropped)."""
    names = [name for name, _ in form.multi_items()]
    others = sorted({name for name in names if name != expected})
    if others:
        shown = ", ".join(repr("".join(c if c.isprintable() else "?" for c in name)[:40]) for name in others[:5])
        hint = "; options such as gradcam go in the query (?gradcam=true)" if expected == "file" else ""
        raise RequestError(400, f"unexpected form field(s) {shown}: send the image(s) as '{expected}'{hint}")
    if expected == "file" and names.count("file") > 1:
        raise RequestError(400, f"{names.count('file')} 'file' fields: /predict scores one image (/predict/batch "
                                f"takes several, as 'files')")


async def answer_unless_gone(request, scoring, gone):
    """The answer of ``scoring`` (a coroutine given ``gone``), which stops once the client has left; marked
    answered, since it is audited: a client leaving after this is not a 499 (the rows say it was answered)."""
    watcher = asyncio.create_task(set_when_disconnected(request, gone))
    try:
        answer = await scoring
    finally:
        watcher.cancel()
    request.state.answered = True
    return answer


def add_routes(app, service: Service, options: ServeOptions):
    from fastapi import File, Request, UploadFile
    from fastapi.responses import HTMLResponse, JSONResponse, Response

    async def health():
        status, body = await service.health()
        return JSONResponse(body, status_code=status)
    # load balancers probe with HEAD too; a route of its own (one route for both gave them one operation ID)
    app.get("/health")(health)
    app.head("/health", include_in_schema=False)(health)

    @app.get("/model")
    async def model_metadata():
        return service.served.predictor.metadata()

    @app.get("/metrics")
    async def metrics():
        await asyncio.to_thread(service.drift_report)  # its chance levels may need simulating: off the loop
        return Response(service.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    page = static_file("index.html", "text/html; charset=utf-8")
    app.get("/", response_class=HTMLResponse)(page)
    app.head("/", response_class=HTMLResponse, include_in_schema=False)(page)
    for name, media_type in (("page.js", "text/javascript; charset=utf-8"), ("page.css", "text/css; charset=utf-8")):
        app.get(f"/{name}", include_in_schema=False)(static_file(name, media_type))
        app.head(f"/{name}", include_in_schema=False)(static_file(name, media_type))  # probes use HEAD too

    @app.post("/predict")
    async def predict(request: Request, file: UploadFile = File(...), gradcam: bool = False):
        check_form_fields(await request.form(), "file")  # the form FastAPI parsed, cached: not read twice
        data, gone = await file.read(options.max_bytes + 1), threading.Event()
        return await answer_unless_gone(request, service.predict_one(data, file.filename, gradcam,
                                                                     request.state.key_id, gone), gone)

    @app.post("/predict/batch")
    async def predict_batch(request: Request, files: list[UploadFile] = File(...)):
        """Several images of one site's batch, scored together; with ``--adapt-batch`` (and at least 32
        in-distribution images) batch-norm statistics are re-estimated on them, and ``notes`` say so."""
        check_form_fields(await request.form(), "files")
        uploads = []
        for upload in files:  # each part's in-memory buffer is freed once copied out
            uploads.append((await upload.read(options.max_bytes + 1), upload.filename))
            await upload.close()
        gone = threading.Event()
        return await answer_unless_gone(request, service.predict_batch(uploads, request.state.key_id, gone), gone)

    @app.post("/admin/reload")
    async def reload():
        """Load the checkpoint (and the API keys) again; requests in progress finish on the old model."""
        result = await service.reload("admin call")
        return JSONResponse(result, status_code=200 if result["status"] == "reloaded" else 500)


def check_exposure(host: str, options: ServeOptions, ssl_certfile) -> None:
    """Off loopback, the server is reachable by others: refuse to start without keys and an audit log."""
    if is_loopback(host):
        return
    missing = [flag for flag, value in (("--api-keys FILE", options.api_keys), ("--audit-log FILE", options.audit_log))
               if not value]
    if missing:
        raise PneumoniaCNNError(f"--host {host} is reachable from other machines: give {' and '.join(missing)} "
                                f"(see the README, 'Deploying in a hospital')")
    if not ssl_certfile:
        log.warning("serving on %s without TLS: keys and images cross the network in clear text unless a TLS "
                    "proxy stands in front (--ssl-certfile/--ssl-keyfile)", host)


def check_tls_files(certfile, keyfile) -> None:
    """Before the model loads: a certificate and key that TLS cannot use, named, instead of '[SSL] PEM lib'."""
    import ssl
    for flag, path in (("--ssl-certfile", certfile), ("--ssl-keyfile", keyfile)):
        if path and special_file(path):  # OpenSSL would wait on a named pipe's writer for ever
            raise PneumoniaCNNError(f"{flag} {path}: not a regular file ({special_file(path)})")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile, keyfile)
    except ssl.SSLError as error:  # PEM_LIB: not PEM; KEY_VALUES_MISMATCH: a key of another certificate
        raise PneumoniaCNNError(f"--ssl-certfile {certfile} / --ssl-keyfile {keyfile}: not a PEM certificate and "
                                f"its private key (OpenSSL: {error.reason or 'unreadable'})") from None
    except OSError as error:
        raise PneumoniaCNNError(f"--ssl-certfile {certfile} / --ssl-keyfile {keyfile}: "
                                f"{error.strerror or error}") from None


def run_server(checkpoint, host: str = "127.0.0.1", port: int = 8000, options: ServeOptions | None = None,
               allowed_hosts=(), ssl_certfile=None, ssl_keyfile=None, idle_timeout: float = 15,
               graceful_timeout: float = 30):
    import uvicorn
    options = options or ServeOptions()
    check_exposure(host, options, ssl_certfile)
    if ssl_certfile:
        check_tls_files(ssl_certfile, ssl_keyfile)
    # The scorer asks glibc to keep freed memory for the next batch; a server also decodes the odd 50-megapixel
    # upload, whose memory must go back to the system rather than stay with the process for good.
    os.environ.setdefault("PNEUMONIA_CNN_MALLOC", "default")
    # ONNX Runtime's threads sleep between batches instead of spinning on the cores that Grad-CAM, decoding and the
    # event loop need
    os.environ.setdefault(IDLE_THREADS, "sleep")
    idle_threads()  # an operator's bad value is said at start, whichever engine scores
    app = create_app(checkpoint, options, allowed_host_names(host, allowed_hosts))
    # a kept-alive connection stays open as long as any other that sends no request head (--idle-timeout). uvicorn's
    # 5 s equalled httpx's own idle limit: under load a client reused a connection just as the server closed it,
    # and the request failed unanswered (ReadError). The client, or the proxy in front, must close first
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, loop="asyncio",
                            http=idle_timeout_protocol(idle_timeout, malformed_counter(app)),
                            timeout_keep_alive=idle_timeout,
                            timeout_graceful_shutdown=graceful_timeout, ssl_certfile=ssl_certfile,
                            ssl_keyfile=ssl_keyfile)  # no limit_concurrency: uvicorn counts idle sockets in
    # it and then answers 503 to everything, /health included; uploads are limited by LimitsMiddleware and idle
    # connections closed by the head timeout
    scheme = "https" if ssl_certfile else "http"
    service = app.state.service
    listening = bound_socket(host, port)  # before the line below says it serves there
    log.info("serving %s on %s://%s:%d (API description at /openapi.json; API keys %s; audit log %s)",
             service.served.model_id, scheme, host, port, "required" if service.keyring else "off",
             options.audit_log or "off")
    handshake_limited_server(config, idle_timeout).run(sockets=[listening])


def malformed_counter(app):
    """Counts a request too malformed for the HTTP parser as a 400 of endpoint "other" (it went uncounted)."""
    counter = app.state.service.metrics.requests.labels("other", "400")
    return counter.inc


def bound_socket(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a port in use is one line (uvicorn logged the "serving" line,
    then its own error)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY on accepted connections only when the listening socket's proto
    # says TCP, and uvicorn sends head and body apart, so Nagle and the client's delayed ACK added 40 ms to
    # every request after the first on a kept-alive connection
    listening = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart reuses the port at once
    try:
        listening.bind((host.strip("[]"), port))
    except OSError as error:
        listening.close()
        raise PneumoniaCNNError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    return listening
