"""Raw HTTP/1.1 over a socket, for what httpx will not do: chunked uploads that never end, stalled bodies,
idle connections, hostile Host headers."""
from __future__ import annotations

import select
import socket
import time

BOUNDARY = "pneumoniacnnboundary"


def multipart_head(filename: str = "big.jpeg", field: str = "file") -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode()


def request_head(port: int, path: str = "/predict", headers: dict | None = None, chunked: bool = True,
                 length: int | None = None) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}",
             f"Content-Type: multipart/form-data; boundary={BOUNDARY}"]
    lines += ["Transfer-Encoding: chunked"] if chunked else [f"Content-Length: {length}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_response(sock: socket.socket, timeout: float = 10) -> bytes:
    """Whatever the server sends until it closes or ``timeout`` passes."""
    sock.settimeout(timeout)
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            if b"\r\n\r\n" in data and data.endswith(b"}"):
                break
    except (TimeoutError, ConnectionResetError):
        pass
    return data


def endless_chunked_upload(port: int, total: int, chunk: int = 256 * 1024, headers: dict | None = None,
                           on_chunk=None) -> tuple[bytes, int]:
    """Send up to ``total`` bytes of a chunked multipart upload, watching for an early answer between chunks.
    Returns (response bytes, body bytes sent before the answer came)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sent = 0
    try:
        sock.sendall(request_head(port, headers=headers))
        head = multipart_head()
        sock.sendall(b"%x\r\n%s\r\n" % (len(head), head))
        payload = b"\xff" * chunk
        while sent < total:
            if select.select([sock], [], [], 0)[0]:
                return read_response(sock), sent
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(payload), payload))
            except (BrokenPipeError, ConnectionResetError):
                return read_response(sock), sent
            sent += len(payload)
            if on_chunk:
                on_chunk(sent)
        return read_response(sock), sent
    finally:
        sock.close()


def status_of(response: bytes) -> int | None:
    try:
        return int(response.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return None


def seconds_until_closed(sock: socket.socket, limit: float) -> float | None:
    """How long until the server closes ``sock`` (None if it stays open for ``limit`` seconds)."""
    start = time.monotonic()
    sock.settimeout(limit)
    try:
        while True:
            if not sock.recv(65536):
                return time.monotonic() - start
    except TimeoutError:
        return None
    except ConnectionResetError:
        return time.monotonic() - start
