"""An HTTP proxy in front of Orthanc that cuts chosen transfers in the middle (it sends the headers and half
of the body, then closes the connection, as a network failure mid-transfer does) or refuses chosen requests
with an HTTP status, as a PACS that lists an instance it can no longer send does."""
from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding"}


class FlakyProxy:
    """``cuts`` maps a substring of the request line ("GET /dicom-web/studies/...") to how many matching
    requests to cut (``float('inf')``: all of them). ``cut_log`` lists the request lines that were cut.
    ``refusals`` maps a substring of the request line to what answers it instead of Orthanc: an HTTP status,
    or (status, body, content type); a key may also be (request-line substring, bytes the request body holds),
    to refuse one of several STOW-RS posts to the same study; a value may be a function of the request line
    that returns one of these. ``seen`` lists every request line."""

    def __init__(self, target: str):
        self.target, self.cuts, self.cut_log = target.rstrip("/"), {}, []
        self.refusals, self.seen = {}, []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                proxy.seen.append(f"{self.command} {self.path}")
                refusal = next((code for key, code in proxy.refusals.items()
                                if _matches(key, proxy.seen[-1], body)), None)
                if callable(refusal):  # an answer made for this request (a fake server's)
                    refusal = refusal(proxy.seen[-1])
                if refusal:
                    status, answer, kind = refusal if isinstance(refusal, tuple) else (refusal, b"", "text/plain")
                    self.send_response(status)
                    self.send_header("Content-Type", kind)
                    self.send_header("Content-Length", str(len(answer)))
                    self.end_headers()
                    self.wfile.write(answer)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP | {"host"}}
                answer = requests.request(self.command, proxy.target + self.path, data=body, headers=headers,
                                          timeout=60)
                cut = proxy._should_cut(f"{self.command} {self.path}")
                self.send_response(answer.status_code)
                for key, value in answer.headers.items():
                    if key.lower() not in HOP_BY_HOP:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content[:len(answer.content) // 2] if cut else answer.content)
                if cut:
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)

            do_GET = do_POST = do_PUT = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.lock = threading.Lock()
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _should_cut(self, request_line: str) -> bool:
        with self.lock:
            for pattern, remaining in self.cuts.items():
                if pattern in request_line and remaining > 0:
                    self.cuts[pattern] = remaining - 1
                    self.cut_log.append(request_line)
                    return True
        return False

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _matches(key, request_line: str, body: bytes) -> bool:
    if isinstance(key, tuple):
        return key[0] in request_line and key[1] in body
    return key in request_line
