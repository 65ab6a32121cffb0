"""TLS contexts and client authentication, from the standard library's ssl, hmac and secrets.

Authentication is challenge-response: the server sends a fresh random nonce, the
client answers HMAC-SHA256(secret, context | nonce | client id). The secret
never crosses the wire, an answer is useless for any other connection (replay),
and the comparison takes constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import ssl
import stat
from pathlib import Path

from fedsock.console import UsageError, warn

TOKEN_ENV = "FEDSOCK_TOKEN"
NONCE_BYTES = 32
_MAC_CONTEXT = b"fedsock-auth-v1\x00"  # binds the answer to this protocol and purpose


def auth_mac(secret: bytes, nonce: bytes, client_id: int) -> str:
    return hmac.new(secret, _MAC_CONTEXT + nonce + b"\x00" + str(client_id).encode(), hashlib.sha256).hexdigest()


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def read_secret_file(path: str, who: str) -> bytes:
    """A secret from a file (first line, whitespace stripped); warns when others may read it."""
    try:
        mode = os.stat(path).st_mode
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read the token file {path}: {exc}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        warn(who, f"{path} can be read by other users; chmod 600 it")
    lines = text.strip().splitlines()
    if not lines or not lines[0].strip():
        raise UsageError(f"the token file {path} is empty")
    return lines[0].strip().encode()


def load_token(path: str | None, who: str) -> bytes | None:
    """The shared enrolment secret: from --auth-token-file, else $FEDSOCK_TOKEN, else none."""
    if path:
        return read_secret_file(path, who)
    value = os.environ.get(TOKEN_ENV, "").strip()
    return value.encode() if value else None


def read_client_secrets(path: str, who: str) -> dict[int, bytes]:
    """Per-client secrets: one `CLIENT_ID SECRET` per line; `#` starts a comment."""
    read_secret_file(path, who)  # same checks: readable, not empty, private
    secrets_by_id: dict[int, bytes] = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit():
            raise UsageError(f"{path}:{number}: expected 'CLIENT_ID SECRET'")
        secrets_by_id[int(parts[0])] = parts[1].encode()
    if not secrets_by_id:
        raise UsageError(f"{path} names no client")
    return secrets_by_id


class Authenticator:
    """The server's view: which secret a claimed client id must prove it knows."""

    def __init__(self, shared: bytes | None = None, per_client: dict[int, bytes] | None = None):
        self.shared = shared
        self.per_client = per_client

    @property
    def required(self) -> bool:
        return self.shared is not None or self.per_client is not None

    def verify(self, client_id: int, nonce: bytes, mac: str) -> bool:
        secret = self.shared if self.per_client is None else self.per_client.get(client_id)
        # An unknown id is checked against a random secret, so the answer looks the
        # same as for a known id with a wrong secret and reveals nothing.
        expected = auth_mac(secret or secrets.token_bytes(32), nonce, client_id)
        # Hex digits in either case are the same answer (fedsock sends lower case).
        return hmac.compare_digest(expected.encode(), mac.lower().encode("utf-8", "replace"))


def _load(what: str, action) -> None:
    try:
        action()
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot load {what}: {getattr(exc, 'reason', None) or exc}") from exc


def server_tls_context(cert: str | None, key: str | None, client_ca: str | None) -> ssl.SSLContext | None:
    if not cert and not key:
        if client_ca:
            raise UsageError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if not (cert and key):
        raise UsageError("--tls-cert and --tls-key go together")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load("--tls-cert/--tls-key", lambda: context.load_cert_chain(cert, key))
    if client_ca:
        # Mutual TLS. OPTIONAL still verifies any certificate sent; the server then refuses
        # a client that sent none with an <ERROR> it can read (transport.open_accepted).
        context.verify_mode = ssl.CERT_OPTIONAL
        _load("--tls-client-ca", lambda: context.load_verify_locations(client_ca))
    return context


def client_tls_context(
    use_tls: bool, ca: str | None, cert: str | None, key: str | None, insecure: bool, who: str
) -> ssl.SSLContext | None:
    if not (use_tls or ca or cert or key or insecure):
        return None
    if bool(cert) != bool(key):
        raise UsageError("--tls-cert and --tls-key go together")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # checks the certificate and the host name
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca:  # trust exactly this CA, not the system's store as well
        _load("--tls-ca", lambda: context.load_verify_locations(ca))
    else:
        context.load_default_certs()
    if insecure:
        warn(who, "--tls-insecure: the server's certificate is NOT checked; anyone in the middle can read and change the traffic")
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if cert:
        _load("--tls-cert/--tls-key", lambda: context.load_cert_chain(cert, key))
    return context
