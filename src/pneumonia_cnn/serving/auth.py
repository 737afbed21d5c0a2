"""API keys: a file of scrypt hashes, ``Authorization: Bearer KEY`` on every request but the public ones.

A key is ``ID.SECRET``: the id names the holder (it goes into the audit log), the secret is 32 random bytes.
The file keeps one line per key, ``ID ROLE scrypt$n$r$p$SALT$HASH``, so a copy of it does not give the keys
away. Each check derives the hash again and compares with ``hmac.compare_digest`` (constant time); an
unknown id is checked against a dummy hash, so a wrong id costs the same time as a wrong secret. A key
that passed once is remembered by its SHA-256 for the process's life (until the file is reloaded), so
scrypt's cost is paid once per key, not once per request. Keys are never logged.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from ..errors import PneumoniaCNNError

log = logging.getLogger(__name__)
ROLES = ("predict", "admin")
KEY_ID = re.compile(r"^[A-Za-z0-9_-]{1,40}$")
SCRYPT = {"n": 2**14, "r": 8, "p": 1}  # 16 MB and a few tens of ms per check: RFC 7914's interactive setting
PUBLIC_PATHS = frozenset({"/", "/health", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/favicon.ico"})


@dataclass(frozen=True)
class KeyRecord:
    key_id: str
    role: str
    n: int
    r: int
    p: int
    salt: bytes
    digest: bytes

    def line(self) -> str:
        encode = lambda b: base64.urlsafe_b64encode(b).decode("ascii")  # noqa: E731
        return f"{self.key_id} {self.role} scrypt${self.n}${self.r}${self.p}${encode(self.salt)}${encode(self.digest)}"


def derive(secret: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(secret.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=2**26, dklen=32)


def parse_line(line: str, where: str) -> KeyRecord:
    try:
        key_id, role, hashed = line.split()
        scheme, n, r, p, salt, digest = hashed.split("$")
        if scheme != "scrypt" or role not in ROLES or not KEY_ID.match(key_id):
            raise ValueError
        return KeyRecord(key_id, role, int(n), int(r), int(p), base64.urlsafe_b64decode(salt),
                         base64.urlsafe_b64decode(digest))
    except ValueError:
        raise PneumoniaCNNError(f"{where}: not a key line (expected 'ID ROLE scrypt$n$r$p$SALT$HASH', "
                                f"written by 'pneumonia-cnn api-key')") from None


def read_key_file(path) -> dict[str, KeyRecord]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise PneumoniaCNNError(f"--api-keys {path}: {error.strerror or error}") from None
    records = {}
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            record = parse_line(line.strip(), f"{path}:{number}")
            records[record.key_id] = record
    if not records:
        raise PneumoniaCNNError(f"--api-keys {path}: no keys in the file (add one with 'pneumonia-cnn api-key')")
    return records


def add_key(path, key_id: str, role: str = "predict") -> str:
    """Append a new key's hash to ``path`` (created mode 0600) and return the key, which is shown once."""
    if not KEY_ID.match(key_id):
        raise PneumoniaCNNError(f"--id {key_id!r}: use 1-40 letters, digits, '-' or '_'")
    if role not in ROLES:
        raise PneumoniaCNNError(f"--role {role}: choose {', '.join(ROLES)}")
    path = Path(path)
    existing = read_key_file(path) if path.exists() and path.stat().st_size else {}
    if key_id in existing:
        raise PneumoniaCNNError(f"{path}: key id {key_id} exists; revoke it first (--revoke)")
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_bytes(16)
    record = KeyRecord(key_id, role, SCRYPT["n"], SCRYPT["r"], SCRYPT["p"], salt, derive(secret, salt, **SCRYPT))
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(descriptor, "a", encoding="utf-8") as handle:
        handle.write(record.line() + "\n")
    return f"{key_id}.{secret}"


def revoke_key(path, key_id: str) -> None:
    from ..fileio import write_text_atomic
    path = Path(path)
    records = read_key_file(path)
    if key_id not in records:
        raise PneumoniaCNNError(f"{path}: no key with id {key_id}")
    kept = [r.line() for k, r in records.items() if k != key_id]
    write_text_atomic(path, "".join(line + "\n" for line in kept))
    os.chmod(path, 0o600)


class KeyRing:
    """The keys a server accepts; ``check(token)`` -> the key's record, or None."""

    def __init__(self, records: dict[str, KeyRecord]):
        self.records = records
        self.passed: dict[bytes, KeyRecord] = {}
        self.dummy = KeyRecord("-", "predict", SCRYPT["n"], SCRYPT["r"], SCRYPT["p"], b"\0" * 16, b"\0" * 32)

    @classmethod
    def from_file(cls, path) -> KeyRing:
        return cls(read_key_file(path))

    def remembered(self, token: str) -> KeyRecord | None:
        return self.passed.get(hashlib.sha256(token.encode("utf-8", "replace")).digest())

    def check(self, token: str) -> KeyRecord | None:
        """Slow for a key not seen before (scrypt): call it off the event loop."""
        key_id, _, secret = token.partition(".")
        record = self.records.get(key_id)
        target = record or self.dummy
        derived = derive(secret, target.salt, target.n, target.r, target.p)
        if hmac.compare_digest(derived, target.digest) and record is not None:
            self.passed[hashlib.sha256(token.encode("utf-8", "replace")).digest()] = record
            return record
        return None


def bearer_token(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


class AccessMiddleware:
    """ASGI: every path but the public ones needs a key; ``/admin/`` needs an admin key. Runs before the
    body is read, so a caller without a key cannot make the server take an upload in."""

    def __init__(self, app, keyring, executor):
        self.app, self.keyring, self.executor = app, keyring, executor  # keyring: () -> KeyRing | None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        import asyncio
        state = scope.setdefault("state", {})
        keyring = self.keyring()
        if keyring is None or scope["path"] in PUBLIC_PATHS:
            state["key_id"], state["role"] = None, ("admin" if keyring is None else None)
            return await self.app(scope, receive, send)
        token = bearer_token(scope["headers"])
        if token is None:
            return await refuse(scope, receive, send, 401, "missing API key: send 'Authorization: Bearer KEY'")
        record = keyring.remembered(token)
        if record is None:
            record = await asyncio.get_running_loop().run_in_executor(self.executor, keyring.check, token)
        if record is None:
            client = (scope.get("client") or ("?",))[0]
            log.warning("refused a request from %s to %s: API key not accepted", client, scope["path"])
            return await refuse(scope, receive, send, 401, "API key not accepted")
        if scope["path"].startswith("/admin/") and record.role != "admin":
            return await refuse(scope, receive, send, 403, f"key {record.key_id} is not an admin key")
        state["key_id"], state["role"] = record.key_id, record.role
        return await self.app(scope, receive, send)


async def refuse(scope, receive, send, status: int, detail: str, headers: dict | None = None):
    """A one-line JSON error; the connection is closed after it, since the body may not have been read."""
    from starlette.responses import JSONResponse
    headers = {"Connection": "close", **(headers or {})}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    await JSONResponse({"detail": detail}, status_code=status, headers=headers)(scope, receive, send)
