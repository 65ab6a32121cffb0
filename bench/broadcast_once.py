"""Benchmark 2: the global model is encoded once per round, and the same bytes go to every client.

A real federation (logreg, 5 real fl_client.py processes). The server runs in a
process of its own started from this file (`--serve`), where two thin wrappers
record every call of `encode_weights` (by `GlobalModel.of`, fedsock/clients.py) and every <MODEL> that
`AsyncConnection.send` writes: which round it is for, and which buffer object
holds its weights. Nothing else in the server changes.

    python bench/broadcast_once.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Proc, Row, kill_all, read_metrics, say  # noqa: E402

CLIENTS = 5
ROUNDS = 3
SUMMARY = "broadcast summary: "


def serve(argv: list[str]) -> int:
    """Run the real server with the two recording wrappers; print what they saw."""
    import fl_server
    from fedsock import clients, transport

    encoded: list[bytearray] = []  # every blob encode_weights returned (kept alive, so `is` is exact)
    sends: list[dict] = []
    real_encode, real_send = clients.encode_weights, transport.AsyncConnection.send

    def counting_encode(*args, **kwargs):
        layout, blob = real_encode(*args, **kwargs)
        encoded.append(blob)
        return layout, blob

    async def recording_send(self, buffers):
        buffers = list(buffers)
        first = bytes(buffers[0][8:]) if buffers else b""
        if first.startswith(b'{"header":"<MODEL>"'):
            blob = memoryview(buffers[-1]).obj
            which = next((i for i, b in enumerate(encoded) if b is blob), None)
            sends.append({"round": json.loads(first)["round"], "connection": id(self), "blob": which,
                          "nbytes": len(blob)})
        return await real_send(self, buffers)

    clients.encode_weights = counting_encode  # GlobalModel.of encodes each round's model with it
    transport.AsyncConnection.send = recording_send
    try:
        code = fl_server.main(argv)
    finally:
        print(SUMMARY + json.dumps({"encode_calls": len(encoded), "sends": sends}), flush=True)
    return code


def run(quick: bool) -> list[Row]:
    procs: list[Proc] = []
    with tempfile.TemporaryDirectory(prefix="fedsock-broadcast-") as tmp:
        try:
            server = Proc(["bench/broadcast_once.py", "--serve", "--model", "logreg", "--num-clients", str(CLIENTS),
                           "--min-clients", str(CLIENTS), "--num-rounds", str(ROUNDS), "--time-to-wait", "60",
                           "--server-port", "0", "--output-dir", tmp, "--quiet"], "server (recording)")
            procs.append(server)
            port = server.wait_for(r"listening on [\d.]+:(\d+)", timeout=120).group(1)
            clients = [Proc(["fl_client.py", "--client-id", str(k), "--server-port", port, "--quiet"], f"client {k}")
                       for k in range(1, CLIENTS + 1)]
            procs.extend(clients)
            codes = [c.finish(timeout=300) for c in clients]
            if server.finish(timeout=120) != 0 or any(codes):
                raise RuntimeError(f"federation failed (clients {codes}):\n{server.tail()}")
            summary = json.loads(server.wait_for(SUMMARY + "(.*)", timeout=1).group(1))
            metrics = read_metrics(Path(tmp) / "metrics.csv")
        finally:
            kill_all(procs)
    sends = summary["sends"]
    rounds = sorted({s["round"] for s in sends})
    per_round = {r: [s for s in sends if s["round"] == r] for r in rounds}
    one_blob = all(len({s["blob"] for s in group}) == 1 and group[0]["blob"] is not None for group in per_round.values())
    everyone = all(len({s["connection"] for s in group}) == CLIENTS for group in per_round.values())
    calls = summary["encode_calls"]
    encodes_per_round = sum(len({s["blob"] for s in group}) for group in per_round.values()) / len(rounds)
    model_bytes = sends[0]["nbytes"]
    sent_per_client = [m["bytes_sent"] / CLIENTS / model_bytes for m in metrics]
    say(f"broadcast: {calls} encode_weights calls for {len(rounds)} rounds, "
        f"{[len(g) for g in per_round.values()]} <MODEL> sends per round, one buffer per round: {one_blob}")
    return [Row(
        "2 broadcast once", f"encodings sent per round ({CLIENTS} clients, logreg, {len(rounds)} rounds)",
        encodes_per_round, "encodings", CLIENTS, "encodes if each client got its own", encodes_per_round / CLIENTS,
        "1 encode/round; one buffer object to all clients", one_blob and everyone and calls == len(rounds) + 1,
        f"encode_weights ran {calls} times: at start, then once after each round (the checkpoints reuse "
        f"those bytes; the last call encodes the final model); each round's "
        f"{CLIENTS} <MODEL> sends wrote the very same bytearray: {'yes' if one_blob and everyone else 'NO'}; "
        f"bytes sent per client per round = {min(sent_per_client):.3f}..{max(sent_per_client):.3f} x model size",
    )]


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        return serve(sys.argv[2:])
    for row in run(quick=False):
        print(json.dumps(row.__dict__))
    return 0


if __name__ == "__main__":
    sys.exit(main())
