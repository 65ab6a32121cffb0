"""Client identities: what binds a client's secure-aggregation keys to the client, so that a
server cannot substitute them (docs: Security model).

The trust model is SSH's known_hosts turned into a tiny certificate authority:

- A **federation key** (Ed25519) is made once, by whoever decides who belongs to the
  federation: `python -m fedsock.enrol`. Its private half stays with them, off the server:
  whoever holds it can enrol clients, and so make Sybils.
- Each client gets an **identity file**: its own Ed25519 key, a certificate (the federation
  key's signature of "client K has this public key"), and the federation's public key, which
  the client pins. It reaches the client out of band, as a per-client secret does.
- In each secure round a client signs its fresh keys (and the round's setup) with its
  identity key, and checks every peer's signature and certificate against the pinned
  federation key. The server relays all of it and can forge none of it.

Why not TLS client certificates: TLS authenticates a client to the server, and the server
is who must not be trusted here; the peers never see each other's TLS certificates. Why not
pin every peer's key (known_hosts proper): a federation of 50 would need 50 keys on every
client, and a new client a change on all of them; a certificate needs one key.

Ed25519 and its encodings are `cryptography`'s (already the home of secure aggregation's
X25519 and ChaCha20).
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from pathlib import Path

from fedsock.console import UsageError

TAG = b"fedsock identity v1"
KEY_BYTES, SIGNATURE_BYTES = 32, 64
FORMAT = 1  # the identity file's "fedsock_identity" field


def _ids(*numbers: int) -> bytes:
    return b"".join(n.to_bytes(8, "big") for n in numbers)


def _private(raw: bytes):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.from_private_bytes(raw)


def new_key() -> tuple[bytes, bytes]:
    """A fresh Ed25519 key pair, (private, public), raw 32 bytes each."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    raw = (serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    return key.private_bytes(*raw), public_of(key.private_bytes(*raw))


def public_of(private: bytes) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return _private(private).public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def sign(private: bytes, message: bytes) -> bytes:
    return _private(private).sign(message)


def verify(public: bytes, signature: bytes, message: bytes) -> bool:
    """True when `signature` is `public`'s over `message`; False for any bad input (a peer's bytes)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if len(public) != KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def certificate_message(client_id: int, public: bytes) -> bytes:
    """What the federation key signs: "client `client_id` has identity key `public`"."""
    return TAG + b" certificate" + _ids(client_id) + public


def certify(federation_private: bytes, client_id: int, public: bytes) -> bytes:
    return sign(federation_private, certificate_message(client_id, public))


def certified(federation_key: bytes, client_id: int, public: bytes, certificate: bytes) -> bool:
    return verify(federation_key, certificate, certificate_message(client_id, public))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def fingerprint(public: bytes) -> str:
    """A short name for a federation key, to compare by eye (SHA-256, as SSH shows host keys)."""
    import hashlib

    return "SHA256:" + base64.b64encode(hashlib.sha256(public).digest()).decode().rstrip("=")


# --------------------------------------------------------------------------- the files


@dataclass(frozen=True)
class Identity:
    """A client's identity file: who it is, its signing key, its certificate, the pinned federation key."""

    client_id: int
    private_key: bytes
    certificate: bytes
    federation_key: bytes

    @property
    def public_key(self) -> bytes:
        return public_of(self.private_key)

    def to_json(self) -> dict:
        return {"fedsock_identity": FORMAT, "client_id": self.client_id, "private_key": b64(self.private_key),
                "certificate": b64(self.certificate), "federation_key": b64(self.federation_key)}


def issue(federation_private: bytes, client_id: int) -> Identity:
    """A new identity for client `client_id`, certified by the federation key."""
    key, public = new_key()
    return Identity(client_id, key, certify(federation_private, client_id, public), public_of(federation_private))


def _field(data: dict, name: str, nbytes: int, path: str) -> bytes:
    try:
        raw = base64.b64decode(data[name], validate=True)
    except KeyError:
        raise UsageError(f"{path}: no {name!r}: not a fedsock identity file (make one with python -m fedsock.enrol)")
    except (TypeError, ValueError):
        raise UsageError(f"{path}: {name!r} is not base64") from None
    if len(raw) != nbytes:
        raise UsageError(f"{path}: {name!r} must be {nbytes} bytes, not {len(raw)}")
    return raw


def _read_json(path: str, what: str) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"cannot read the {what} {path}: {exc.strerror or exc}") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path} is not a {what} (not JSON: {exc})") from exc
    if not isinstance(data, dict):
        raise UsageError(f"{path} is not a {what} (a JSON object was expected)")
    return data


def load_identity(path: str, client_id: int) -> Identity:
    """A client's identity file, checked: its own certificate must verify under the federation key
    it pins, for this client id (UsageError, one line, otherwise)."""
    data = _read_json(path, "identity file")
    if data.get("fedsock_identity") != FORMAT:
        raise UsageError(f"{path} is not a fedsock identity file of format {FORMAT} (make one with "
                         f"python -m fedsock.enrol)")
    identity = Identity(data.get("client_id"), _field(data, "private_key", KEY_BYTES, path),
                        _field(data, "certificate", SIGNATURE_BYTES, path),
                        _field(data, "federation_key", KEY_BYTES, path))
    if identity.client_id != client_id:
        raise UsageError(f"{path} is the identity of client {identity.client_id!r}, not of client {client_id}")
    if not certified(identity.federation_key, client_id, identity.public_key, identity.certificate):
        raise UsageError(f"{path}: its certificate does not verify under its federation key (damaged, or edited)")
    return identity


def enrolled_identities(federation: str, ids) -> dict[int, Identity]:
    """The identities beside a federation.pub, one per id, as python -m fedsock.enrol wrote them there:
    what a simulation's virtual clients sign with."""
    folder = Path(federation).parent
    missing = [k for k in ids if not (folder / f"client-{k}.identity").exists()]
    if missing:
        raise UsageError(f"no identity for client {missing[0]} beside {federation} (make them with python -m "
                         f"fedsock.enrol --clients {max(ids)} --dir {folder})")
    return {k: load_identity(str(folder / f"client-{k}.identity"), k) for k in ids}


def load_federation_key(path: str) -> bytes:
    """The federation's public key (federation.pub), which the server checks clients' keys against."""
    data = _read_json(path, "federation key file")
    if "federation_private_key" in data:
        raise UsageError(f"{path} is the federation's private key: give the server federation.pub, and keep "
                         f"the private key off the server")
    return _field(data, "federation_key", KEY_BYTES, path)


def write_private(path: Path, data: dict) -> None:
    """A JSON file only its owner may read (0600 from the start: never readable for a moment)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        json.dump(data, out, indent=1)
        out.write("\n")
