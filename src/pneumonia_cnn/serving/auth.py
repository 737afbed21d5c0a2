"""API keys: a file of scrypt hashes, ``Authorization: Bearer KEY`` on every request but the public ones.

A key is ``ID.SECRET``: the id names the holder (it goes into the audit log), the secret is 32 random bytes.
The file keeps one line per key, ``ID ROLE scrypt$n$r$p$SALT$HASH``, so a copy of it does not give the keys
away. Each check derives the hash again and compares with ``hmac.compare_digest`` (constant time); an
unknown id is checked against a dummy hash, so a wrong id costs the same time as a wrong secret. A key
that passed once is remembered by its SHA-256 for the process's life (across reloads while its line is
unchanged), so scrypt's cost is paid once per key, not once per request. At most
``MAX_PENDING_KEY_CHECKS`` new keys wait for scrypt at once (503 beyond; requests that bring the same new
key share its check), so a flood of wrong keys cannot build a queue that a real key then waits behind. Keys
are never logged; refusals are, at most once per ``LOG_REFUSALS_EVERY`` s.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import PneumoniaCNNError

log = logging.getLogger(__name__)
ROLES = ("predict", "admin")
KEY_ID = re.compile(r"[A-Za-z0-9_-]{1,40}")  # whole id: fullmatch ("$" let a final newline in)
SCRYPT = {"n": 2**14, "r": 8, "p": 1}  # 16 MB and a few tens of ms per check: RFC 7914's interactive setting
MAX_PENDING_KEY_CHECKS = 8  # new keys waiting for scrypt (one thread, tens of ms each); more get 503
LOG_REFUSALS_EVERY = 10.0  # seconds between log lines about refused keys
PUBLIC_PATHS = frozenset({"/", "/page.js", "/page.css", "/health", "/openapi.json", "/favicon.ico"})


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


def token_digest(token: str) -> bytes:
    """How a key that passed is remembered (never the key itself)."""
    return hashlib.sha256(token.encode("utf-8", "replace")).digest()


SCRYPT_MAXMEM = 2**26  # what one check may take (64 MB; api-key's settings need 16 MB)
# the most work (n·r·p) one line may ask for: 16 times api-key's (a second or so). Each new key is checked on the
# one key thread, so a line asking for 1000 times the work (p=1000 is valid scrypt) held every other new key's
# first request for a minute.
MAX_SCRYPT_WORK = 16 * SCRYPT["n"] * SCRYPT["r"] * SCRYPT["p"]


def derive(secret: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(secret.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=SCRYPT_MAXMEM, dklen=32)


def scrypt_problem(n: int, r: int, p: int) -> str | None:
    """Why ``derive`` cannot use these settings (hashlib.scrypt would raise on every check of the key: a 500
    that told the id exists), or asks too much of the key thread; None when it can. OpenSSL's rules: n a power
    of 2 above 1 and below 2**(16·r), r and p at least 1, and 128·r·(n + p + 2) bytes within maxmem."""
    if n < 2 or n & (n - 1):
        return f"n={n} is not a power of 2 above 1"
    if r < 1 or p < 1:
        return f"r={r}, p={p}: each must be 1 or more"
    if n.bit_length() - 1 >= 16 * r:
        return f"n={n} is too large for r={r} (scrypt needs n below 2**{16 * r})"
    if 128 * r * (n + p + 2) > SCRYPT_MAXMEM:
        return f"n={n}, r={r}, p={p} need {128 * r * (n + p + 2):,} bytes per check, more than the " \
               f"{SCRYPT_MAXMEM:,} allowed"
    if n * r * p > MAX_SCRYPT_WORK:
        return f"n={n}, r={r}, p={p} ask {n * r * p / (MAX_SCRYPT_WORK // 16):.0f} times the work of api-key's " \
               f"settings, more than the 16 allowed"
    return None


def parse_line(line: str, where: str, file=None) -> KeyRecord:
    """One key line; ``where`` (FILE:LINE) names it in refusals, ``file`` in the command that revokes it."""
    try:
        key_id, role, hashed = line.split()
        scheme, n, r, p, salt, digest = hashed.split("$")
        if scheme != "scrypt" or role not in ROLES or not KEY_ID.fullmatch(key_id):
            raise ValueError
        record = KeyRecord(key_id, role, int(n), int(r), int(p), base64.urlsafe_b64decode(salt),
                           base64.urlsafe_b64decode(digest))
    except ValueError:
        raise PneumoniaCNNError(f"{where}: not a key line (expected 'ID ROLE scrypt$n$r$p$SALT$HASH', "
                                f"written by 'pneumonia-cnn api-key')") from None
    problem = scrypt_problem(record.n, record.r, record.p)
    if problem:
        raise PneumoniaCNNError(f"{where}: key {key_id} has unusable scrypt settings ({problem}); revoke it "
                                f"(pneumonia-cnn api-key {file or 'FILE'} --id {key_id} --revoke) and add a new one")
    return record


MAX_KEY_FILE_BYTES = 16 * 1024 * 1024  # about 100,000 keys; a larger file is none (a log, an image, a disk)


def read_key_file(path, allow_empty: bool = False, option: str | None = "--api-keys") -> dict[str, KeyRecord]:
    """The keys in ``path``; ``option``: the flag that named the file, shown before it in refusals (None: the
    file alone, as api-key's own FILE argument)."""
    path = Path(path)
    return parse_key_text(_key_file_text(path, option), path, allow_empty, option)


def _key_file_text(path: Path, option: str | None) -> str:
    from ..fileio import special_file
    named = f"{option} {path}" if option else str(path)
    kind = special_file(path)
    if kind:  # a pipe waited for a writer for ever; /dev/full was read until the memory ran out
        raise PneumoniaCNNError(f"{named}: not a key file (not a regular file: {kind})")
    try:
        if path.stat().st_size > MAX_KEY_FILE_BYTES:
            raise PneumoniaCNNError(f"{named}: not a key file ({path.stat().st_size / 2**20:.0f} MB; "
                                    f"a key file holds one short line per key)")
        return path.read_text(encoding="utf-8")
    except OSError as error:
        raise PneumoniaCNNError(f"{named}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise PneumoniaCNNError(f"{named}: not a key file (not UTF-8 text)") from None


def parse_key_text(text: str, path: Path, allow_empty: bool = False, option: str | None = "--api-keys",
                   skip_id: str | None = None) -> dict[str, KeyRecord]:
    """Every key line of ``text`` (comments and blank lines aside), checked; lines of ``skip_id`` are not
    parsed (revoking a key whose line is unusable)."""
    records = {}
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#") and line.split()[0] != skip_id:
            record = parse_line(line.strip(), f"{path}:{number}", path)
            records[record.key_id] = record
    if not records and not allow_empty:
        raise PneumoniaCNNError(f"{option + ' ' if option else ''}{path}: no keys in the file (add one with "
                                f"'pneumonia-cnn api-key')")
    return records


def add_key(path, key_id: str, role: str = "predict", option: str | None = "--api-keys") -> str:
    """Append a new key's hash to ``path`` (created mode 0600) and return the key, which is shown once;
    ``option`` as ``read_key_file``'s."""
    if not KEY_ID.fullmatch(key_id):
        raise PneumoniaCNNError(f"--id {key_id!r}: use 1-40 letters, digits, '-' or '_'")
    if role not in ROLES:
        raise PneumoniaCNNError(f"--role {role}: choose {', '.join(ROLES)}")
    path = Path(path)
    existing = read_key_file(path, allow_empty=True, option=option) if path.exists() else {}
    if key_id in existing:
        raise PneumoniaCNNError(f"{path}: key id {key_id} exists; revoke it first (--revoke)")
    if not path.parent.is_dir():  # "[Errno 2] No such file or directory: 'nodir/k.txt'", raw
        raise PneumoniaCNNError(f"{path}: cannot write the key file (no folder {path.parent})")
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_bytes(16)
    record = KeyRecord(key_id, role, SCRYPT["n"], SCRYPT["r"], SCRYPT["p"], salt, derive(secret, salt, **SCRYPT))
    try:
        unterminated = path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n")
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        _owner_only(descriptor, path)  # before the new hash is written, as revoke leaves the file
        with os.fdopen(descriptor, "a", encoding="utf-8") as handle:  # a last line without its newline stays whole
            handle.write(("\n" if unterminated else "") + record.line() + "\n")
    except OSError as error:
        raise PneumoniaCNNError(f"{path}: cannot write the key file ({error.strerror or error})") from None
    return f"{key_id}.{secret}"


def _owner_only(descriptor: int, path: Path) -> None:
    """Mode 0600 on the open key file (through a link, its target), as docs/hospital.md says and revoke
    leaves it: an existing 0644 file kept its mode, and every new key's hash with it. Where it cannot be set
    (another user's file), one warning naming the file and its mode; the key is still added."""
    import stat
    mode = stat.S_IMODE(os.fstat(descriptor).st_mode)
    if mode == 0o600:
        return
    try:
        os.fchmod(descriptor, 0o600)
    except OSError as error:
        log.warning("%s: mode %04o, not 0600 (cannot set it: %s); others may read the key hashes", path, mode,
                    error.strerror or error)
        return
    log.warning("%s: mode %04o set to 0600 (a key file is its owner's alone)", path, mode)


def revoke_key(path, key_id: str, option: str | None = "--api-keys") -> None:
    """Remove ``key_id``'s line(s); the other lines must be usable key lines, this key's need not be (an
    unusable line is revoked to be replaced). A link is kept: its target is rewritten (atomically, beside the
    target, mode 0600), as adding a key appends to the target; replacing the link left the target, which the
    server may read, with the revoked key."""
    from ..fileio import atomic_path
    path = Path(path)
    text = _key_file_text(path, option)
    parse_key_text(text, path, allow_empty=True, option=option, skip_id=key_id)
    lines = text.splitlines()
    kept = [line for line in lines  # comments and blank lines stay
            if line.split()[:1] != [key_id] or line.lstrip().startswith("#")]
    if len(kept) == len(lines):
        raise PneumoniaCNNError(f"{path}: no key with id {key_id}")
    try:
        with atomic_path(path.resolve(), mode=0o600) as temporary:
            temporary.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    except OSError as error:
        raise PneumoniaCNNError(f"{path}: cannot write the key file ({error.strerror or error})") from None


class KeyRing:
    """The keys a server accepts; ``check(token)`` -> the key's record, or None."""

    def __init__(self, records: dict[str, KeyRecord]):
        self.records = records
        self.passed: dict[bytes, KeyRecord] = {}
        self.dummy = KeyRecord("-", "predict", SCRYPT["n"], SCRYPT["r"], SCRYPT["p"], b"\0" * 16, b"\0" * 32)

    @classmethod
    def from_file(cls, path) -> KeyRing:
        return cls(read_key_file(path))

    def keep_passed(self, previous: KeyRing | None) -> KeyRing:
        """Remember the keys ``previous`` accepted whose line is unchanged here, so that a reload does not make
        every client pay scrypt again (behind whatever wrong keys are waiting to be checked)."""
        if previous is not None:
            self.passed.update({digest: record for digest, record in previous.passed.items()
                                if self.records.get(record.key_id) == record})
        return self

    def remembered(self, token: str) -> KeyRecord | None:
        return self.passed.get(token_digest(token))

    def check(self, token: str) -> KeyRecord | None:
        """Slow for a key not seen before (scrypt): call it off the event loop."""
        key_id, _, secret = token.partition(".")
        record = self.records.get(key_id)
        target = record or self.dummy
        derived = derive(secret, target.salt, target.n, target.r, target.p)
        if hmac.compare_digest(derived, target.digest) and record is not None:
            self.passed[token_digest(token)] = record
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

    def __init__(self, app, keyring, executor, max_pending_checks: int = MAX_PENDING_KEY_CHECKS):
        self.app, self.keyring, self.executor = app, keyring, executor  # keyring: () -> KeyRing | None
        self.max_pending, self.checking = max_pending_checks, {}  # (key file, token digest) -> its check
        self.refused, self.logged_at = 0, -LOG_REFUSALS_EVERY

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        import asyncio
        state = scope.setdefault("state", {})
        keyring = self.keyring()
        if keyring is None or scope["path"] in PUBLIC_PATHS:
            state["key_id"], state["role"] = None, ("admin" if keyring is None else None)
            return await self.app(scope, receive, send)
        sent = sum(name == b"authorization" for name, _ in scope["headers"])
        if sent > 1:  # the first had been taken, the others ignored, whatever the proxies in between made of them
            return await refuse(scope, receive, send, 400, f"{sent} Authorization headers: send one")
        token = bearer_token(scope["headers"])
        if token is None:  # a header of another scheme ("Basic ...") is not a missing one: say which it is
            what = "missing API key" if not sent else "Authorization is not a Bearer key (another scheme, or empty)"
            return await refuse(scope, receive, send, 401, f"{what}: send 'Authorization: Bearer KEY'")
        record = keyring.remembered(token)
        if record is None:
            check = self._pending_check(keyring, token)
            if check is None:  # a flood of new keys: do not queue scrypt checks without end
                self._log_refusal(scope, "too many new API keys being checked")
                return await refuse(scope, receive, send, 503, "busy: too many new API keys being checked; retry "
                                                               "in a second", {"Retry-After": "1"})
            record = await asyncio.shield(check)  # a client that leaves must not cancel the others' check
        if record is None:
            self._log_refusal(scope, "API key not accepted")
            return await refuse(scope, receive, send, 401, "API key not accepted")
        if scope["path"].startswith("/admin/") and record.role != "admin":
            return await refuse(scope, receive, send, 403, f"key {record.key_id} is not an admin key")
        state["key_id"], state["role"] = record.key_id, record.role
        return await self.app(scope, receive, send)

    def _pending_check(self, keyring: KeyRing, token: str):
        """The scrypt check of ``token`` on the key thread, shared by every request that brings the same new
        key meanwhile (a client's first burst) against the same key file (a check begun before a reload does not
        answer for the file read since); None when MAX_PENDING_KEY_CHECKS other keys already wait."""
        import asyncio
        slot = (id(keyring), token_digest(token))
        check = self.checking.get(slot)
        if check is None and len(self.checking) < self.max_pending:
            check = asyncio.get_running_loop().run_in_executor(self.executor, keyring.check, token)
            self.checking[slot] = check
            check.add_done_callback(lambda _: self.checking.pop(slot, None))
        return check

    def _log_refusal(self, scope, reason: str) -> None:
        """At most one line per LOG_REFUSALS_EVERY seconds, with the count since the last line (401s and the
        503s of a key flood alike): a flood of wrong keys must not flood the log."""
        self.refused += 1
        now = time.monotonic()
        if now - self.logged_at >= LOG_REFUSALS_EVERY:
            client = (scope.get("client") or ("?",))[0]
            log.warning("refused a request from %s to %s: %s (%d refused since the last such line)", client,
                        scope["path"], reason, self.refused)
            self.refused, self.logged_at = 0, now


SECURITY_HEADERS = [(name.encode(), value.encode()) for name, value in (
    # the page runs only its own script and style (no inline code, nothing from elsewhere) and is never framed
    ("content-security-policy", "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
                                "script-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"),
    ("x-content-type-options", "nosniff"), ("x-frame-options", "DENY"), ("referrer-policy", "no-referrer"),
    ("cache-control", "no-store"),  # a patient's result is kept by no browser or proxy cache
)]
MAX_HEAD_BYTES, MAX_HEAD_FIELDS = 32 * 1024, 100  # nginx: 4 buffers of 8 KiB; real clients send some 20 fields
ANY_IP_ADDRESS = "<any ip address>"  # lower case, as HostCheckMiddleware keeps its names


def is_ip_address(host: str) -> bool:
    import ipaddress
    try:
        ipaddress.ip_address(host[1:-1] if host.startswith("[") and host.endswith("]") else host)
    except ValueError:
        return False
    return True


def host_name(headers: list[tuple[bytes, bytes]]) -> str:
    """The Host header's name without its port (``[::1]:8000`` -> ``[::1]``)."""
    host = next((value.decode("latin-1") for name, value in headers if name == b"host"), "").strip().lower()
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.split(":", 1)[0].rstrip(".")  # "x.example." is the same name as "x.example"


class HostCheckMiddleware:
    """ASGI: answers only requests whose Host header names this server (a DNS-rebinding page's name gets 400),
    with the same one-line JSON error as every other refusal."""

    def __init__(self, app, allowed_hosts):
        """``allowed_hosts``: names, ``*`` (any) or ``*.example.org`` (its subdomains), as Starlette's."""
        self.app, self.allowed = app, frozenset(name.lower() for name in allowed_hosts)

    def allows(self, host: str) -> bool:
        """No Host at all (HTTP/1.0 health checks) is no browser, so no DNS rebinding: allowed. So is any IP
        address where the allowed hosts hold ``ANY_IP_ADDRESS`` (``app.allowed_host_names``)."""
        return not host or "*" in self.allowed or host in self.allowed or any(
            pattern.startswith("*.") and host.endswith(pattern[1:]) for pattern in self.allowed) or (
            ANY_IP_ADDRESS in self.allowed and is_ip_address(host))

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and (too_large := head_too_large(scope)):
            return await refuse(scope, receive, send, 431, too_large)
        if scope["type"] != "http" or self.allows(host_name(scope["headers"])):
            return await self.app(scope, receive, send)
        shown = "".join(c if c.isprintable() else "?" for c in host_name(scope["headers"]))[:100]
        served = "loopback, the bound address" + (", this machine's names, any IP address" if ANY_IP_ADDRESS in
                                                  self.allowed else "") + " and --allowed-hosts are"
        return await refuse(scope, receive, send, 400, f"Host {shown!r} is not served here ({served})")


def head_too_large(scope) -> str | None:
    """Why a request's head (its target and header fields) is refused, as nginx refuses one beyond its header
    buffers: h11 took 5,000 fields or a 100 KiB header in one read and answered 200; None when it is not."""
    size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + sum(
        len(name) + len(value) for name, value in scope["headers"])
    if size <= MAX_HEAD_BYTES and len(scope["headers"]) <= MAX_HEAD_FIELDS:
        return None
    return (f"request head too large: {size} bytes in {len(scope['headers'])} header fields and the target (at "
            f"most {MAX_HEAD_BYTES} bytes and {MAX_HEAD_FIELDS} fields)")


async def refuse(scope, receive, send, status: int, detail: str, headers: dict | None = None):
    """A one-line JSON error; the connection is closed after it, since the body may not have been read."""
    from starlette.responses import JSONResponse
    headers = {"Connection": "close", **(headers or {})}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    await JSONResponse({"detail": detail}, status_code=status, headers=headers)(scope, receive, send)
