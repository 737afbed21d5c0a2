"""What an upload request carries besides its images: its query, and the multipart body's framing.

The routes that take a body are ``upload_route`` routes. Before the body is read, a query parameter the route
does not take is refused (``/predict?threshold=0.01&prevalence=0.5`` was answered at the saved threshold and rate,
``/predict/batch?gradcam=true`` without heat maps, both 200). The multipart body is then parsed here, and FastAPI
finds it parsed (Starlette keeps a request's form): under a file limit that is the server's own (Starlette's
"Maximum number of files is 1000" named a limit the server does not have: a batch takes 256), and with the reason
the parser gives for a body it cannot read ("Invalid multipart data." said none). A body that ends before its
closing boundary is said to be incomplete (its parts were dropped in silence: "no multipart field 'file'", the
field sent), and a client that leaves during its upload is a 499, as one that leaves during scoring (Starlette's
ClientDisconnect was an internal error: "failed", uvicorn's ERROR and a 69-line traceback per departed client).

Imported by ``create_app`` only: FastAPI and Starlette are the ``serve`` extra's.
"""
from __future__ import annotations

import logging
import re
from contextlib import aclosing

from fastapi.routing import APIRoute
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from .service import ClientGone, RequestError, too_many_files

log = logging.getLogger(__name__)

MAX_TEXT_FIELDS = 16  # every text field is refused anyway (check_form_fields): a few, to name them
SET_AT_START = {  # query parameters clients try, and where the server's setting comes from instead
    "threshold": "the decision threshold is the checkpoint's, fitted on validation (evaluate --threshold POLICY "
                 "--save-as FILE writes a checkpoint with another one, to serve)",
    "prevalence": "the server's rate is set when it starts (serve --prevalence RATE|estimate)",
    "adapt_batch": "batch adaptation is set when the server starts (serve --adapt-batch)",
    "engine": "the engine is set when the server starts (serve --engine)",
    "device": "the device is set when the server starts (serve --device)",
}
PARSER_REASONS = (  # the parser's words (python-multipart, Starlette) -> what the client can do about them
    (r"maximum header size", "a part's header is longer than the parser's limit (about 4 KB): shorten the file name"),
    (r"maximum header count", "a part has too many header lines"),
    (r"missing boundary", "the Content-Type header has no boundary=...; let the HTTP client set it"),
    (r'"name" must be provided', "a part has no name in its Content-Disposition header"),
    (r"part exceeded maximum size", "a text field over 1 MB; images go in file fields"),
    # bare LF line ends, or text after a boundary: the boundary was found, so the body is multipart, if ill-formed
    (r"did not find (cr|lf) at end of boundary", "a boundary line does not end in CR LF (multipart/form-data lines "
                                                 "end in CR LF, with nothing after the boundary)"),
)
# python-multipart's words for a first line that is not "--" + the declared boundary: "Expected boundary character
# 45, got 104 at index 2" for a body that is not multipart at all (or was written with another boundary)
NOT_MULTIPART = r"^expected boundary character"
URLENCODED = "application/x-www-form-urlencoded"  # a form without files: FastAPI names the field sent as text


def safe_name(name: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in name)[:40] or "''"


def query_problem(path: str, items, taken) -> str | None:
    """Why the query ``items`` [(name, value)] is refused on ``path``, whose parameters are ``taken``, or None."""
    counts = {}
    for name, _ in items:
        counts[name] = counts.get(name, 0) + 1
    problems = []
    for name, count in counts.items():
        shown, key = safe_name(name), name.strip().lower().replace("-", "_")
        if name in taken and count > 1:
            problems.append(f"{shown}: given {count} times; give it once")
        elif name in taken:
            continue
        elif key == "gradcam" and path == "/predict/batch":
            problems.append(f"{shown}: not taken by /predict/batch; heat maps are made one image at a time "
                            f"(/predict?gradcam=true)")
        elif key in SET_AT_START:
            problems.append(f"{shown}: not a request parameter; {SET_AT_START[key]}")
        else:
            offered = ", ".join(f"?{n}=" for n in taken) or "no query parameters"
            problems.append(f"{shown}: not a parameter of {path} (it takes {offered})")
    return "; ".join(problems[:3]) or None


class UploadFormParser(MultiPartParser):
    """Starlette's parser, which also says why a part meant as a file is not one, and notes whether the body
    reached its closing boundary (python-multipart's ``finalize`` does not check: a part cut short is dropped)."""

    began, ended = False, False

    def on_part_begin(self) -> None:
        self.began = True
        super().on_part_begin()

    def on_end(self) -> None:
        self.ended = True
        super().on_end()

    def on_headers_finished(self) -> None:
        disposition = self._current_part.content_disposition or b""
        if re.search(rb";\s*filename\*", disposition, re.I) and not re.search(rb";\s*filename\s*=", disposition, re.I):
            field = re.search(rb';\s*name="?([^";]*)', disposition)
            raise FileNameOnlyExtended(field.group(1).decode("latin-1") if field else "")
        super().on_headers_finished()


class FileNameOnlyExtended(MultiPartException):
    def __init__(self, field: str):
        super().__init__(f"field '{safe_name(field)}': its file name is given only as filename*= (RFC 5987), which "
                         f"multipart/form-data does not use (RFC 7578, section 4.2): send filename=\"chest.jpeg\"")


def multipart_refusal(error: MultiPartException, path: str, max_files: int) -> RequestError:
    """The parser's refusal as the server's: the server's own file limit, and the reason where one was given."""
    if isinstance(error, FileNameOnlyExtended):
        return RequestError(400, error.message)
    if error.message.startswith("Too many files"):
        if path == "/predict/batch":
            return RequestError(413, too_many_files(max_files))
        return RequestError(400, f"more than {max_files:,} files: /predict scores one image, sent as field 'file' "
                                 f"(/predict/batch takes several, as 'files')")
    if error.message.startswith("Too many fields"):
        return RequestError(400, f"more than {MAX_TEXT_FIELDS} text fields: send the image(s) as file field(s) "
                                 f"('file' for /predict, 'files' for /predict/batch)")
    reason = str(error.__cause__ or error.message)
    if re.search(NOT_MULTIPART, reason, re.I):
        return RequestError(400, not_multipart(path))
    for pattern, said in PARSER_REASONS:
        if re.search(pattern, reason, re.I):
            return RequestError(400, f"multipart/form-data body not readable: {said}")
    # offsets ("at 57", "(57)", "at index 2") mean nothing to the client
    reason = re.sub(r"\s+(at\s+(index\s+)?\d+|\(\d+\))$", "", " ".join(reason.split())).rstrip(".")
    return RequestError(400, f"multipart/form-data body not readable: {reason[:200] or 'malformed'}")


def field_of(path: str) -> str:
    return "files" if path == "/predict/batch" else "file"


def not_multipart(path: str) -> str:
    field = field_of(path)
    return (f"body not multipart/form-data, though its Content-Type says so: it does not begin with the boundary "
            f"the Content-Type declares (--BOUNDARY); send the image(s) as multipart/form-data field '{field}' "
            f"(curl -F {field}=@chest.jpeg)")


def not_multipart_type(content_type: str, path: str) -> str:
    field = field_of(path)
    return (f"body is {safe_name(content_type)}, not multipart/form-data: send the image(s) as multipart/form-data "
            f"field '{field}' (curl -F {field}=@chest.jpeg)")


def incomplete(path: str) -> str:
    return (f"multipart/form-data body incomplete: it ends before its closing boundary (--BOUNDARY-- after the last "
            f"part), so its last part is cut short; send the whole body (field '{field_of(path)}')")


async def read_form(request, path: str, max_files: int) -> None:
    """Parse a multipart body into the request's form, where FastAPI finds it (another body: left to FastAPI).
    A client gone before its body ended is a 499 (``ClientGone``: no error logged, no audit row)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in ("", "multipart/form-data", URLENCODED):  # a raw image/png body: say what was sent
        raise RequestError(400, not_multipart_type(content_type, path))
    if content_type != "multipart/form-data" or getattr(request, "_form", None) is not None:
        return
    try:
        async with aclosing(request.stream()) as stream:  # as Starlette reads it: the stream closed on a refusal
            parser = UploadFormParser(request.headers, stream, max_files=max_files, max_fields=MAX_TEXT_FIELDS)
            form = await parser.parse()
    except MultiPartException as error:
        raise multipart_refusal(error, path, max_files) from None
    except ClientDisconnect:
        log.debug("%s %s: the client left during its upload (499)", request.method, path)
        raise ClientGone() from None
    if parser.began and not parser.ended:  # an empty body: FastAPI's "no multipart field", which is what it is
        for file in parser._files_to_close_on_error:  # the parts read, and the one cut short
            file.close()
        raise RequestError(400, incomplete(path))
    request._form = form  # Starlette's cache of the form: request.form() returns it


def upload_route(max_files: int):
    """The route class of an app whose upload routes take at most ``max_files`` files."""

    class UploadRoute(APIRoute):
        def get_route_handler(self):
            handler = super().get_route_handler()
            if self.body_field is None:  # no body, no upload: as FastAPI has it
                return handler
            path, taken = self.path, tuple(field.alias for field in self.dependant.query_params)

            async def read_then_handle(request):
                problem = query_problem(path, request.query_params.multi_items(), taken)
                if problem:
                    raise RequestError(400, problem)
                await read_form(request, path, max_files)
                return await handler(request)
            return read_then_handle
    return UploadRoute
