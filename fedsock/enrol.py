"""Enrol clients in a federation: `python -m fedsock.enrol --clients 3`.

Makes (once) the federation key, and an identity file for each client named (fedsock/
identity.py says what they are and why). Run it where the federation's membership is
decided, not on the server: whoever holds federation.key can enrol clients. Running it
again adds clients and keeps the ones already enrolled.

    federation/federation.key      the federation's private key (0600): keep it here
    federation/federation.pub      its public key: give it to the server (--federation)
    federation/client-K.identity   client K's identity (0600): give it to client K only
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fedsock import identity
from fedsock.console import ArgumentParser, HelpFormatter, UsageError, run_main, say

WHO = "enrol"


def client_ids(text: str) -> list[int]:
    """`3` (clients 1..3), or a list of ids and ranges: `4,7-9`."""
    if text.isdigit():
        count = int(text)
        if not 1 <= count <= 100_000:
            raise ValueError(f"{text}: between 1 and 100000 clients")
        return list(range(1, count + 1))
    ids: set[int] = set()
    for part in text.split(","):
        low, dash, high = part.partition("-")
        if not low.isdigit() or (dash and not high.isdigit()) or int(low) < 1 or (high and int(high) < int(low)):
            raise ValueError(f"{part!r} is not a client id or a range of them like 4-9")
        ids.update(range(int(low), int(high or low) + 1))
    return sorted(ids)


def federation_key(folder: Path) -> bytes:
    """The federation's private key: read, or made (with federation.pub) if the folder has none."""
    key_path, pub_path = folder / "federation.key", folder / "federation.pub"
    if key_path.exists():
        try:
            data = json.loads(key_path.read_text(encoding="utf-8"))
            return identity._field(data, "federation_private_key", identity.KEY_BYTES, str(key_path))
        except (OSError, ValueError, AttributeError) as exc:
            raise UsageError(f"cannot read {key_path}: {exc}") from exc
    folder.mkdir(parents=True, exist_ok=True)
    private, public = identity.new_key()
    identity.write_private(key_path, {"federation_private_key": identity.b64(private)})
    pub_path.write_text(json.dumps({"federation_key": identity.b64(public)}) + "\n", encoding="utf-8")
    say(WHO, f"made the federation key {key_path} ({identity.fingerprint(public)}): keep it off the server; "
             f"whoever holds it can enrol clients")
    return private


def enrol(folder: Path, ids: list[int]) -> None:
    private = federation_key(folder)
    public = identity.public_of(private)
    for client_id in ids:
        path = folder / f"client-{client_id}.identity"
        if path.exists():
            say(WHO, f"client {client_id}: {path} exists, kept")
            continue
        identity.write_private(path, identity.issue(private, client_id).to_json())
        say(WHO, f"client {client_id}: {path}")
    say(WHO, f"federation {identity.fingerprint(public)}. Now:")
    say(WHO, f"  server:   python fl_server.py --secure-aggregation --federation {folder / 'federation.pub'}")
    say(WHO, f"  client K: python fl_client.py --client-id K --identity {folder}/client-K.identity")
    say(WHO, "  (on other machines: copy client-K.identity to client K only, over a channel you trust)")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m fedsock.enrol", description=__doc__.split("\n\n")[0] + "\n\n" +
                            __doc__.split("\n\n", 1)[1], formatter_class=HelpFormatter)
    parser.add_argument("--clients", required=True, metavar="IDS",
                        help="N (clients 1..N), or ids and ranges such as 4,7-9")
    parser.add_argument("--dir", default="federation", metavar="DIR", help="where the keys and identities go")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        ids = client_ids(args.clients)
    except ValueError as exc:
        parser.error(f"--clients {exc}")
    enrol(Path(args.dir), ids)
    return 0


def cli() -> int:
    return run_main("python -m fedsock.enrol", main)


if __name__ == "__main__":
    sys.exit(cli())
