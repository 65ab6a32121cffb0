"""What a person reads: a peer's text cannot forge a log line or drive the terminal; a mistyped flag is
refused with the closest one.

A hostile client's <ERROR> (or a hostile server's) carries a newline and a forged log line, ANSI
escapes and a bidirectional override; the server's console and the client's error line show
them escaped, on one line. In-process: the server's reader of test_order.py, and run_main.
"""

from __future__ import annotations

import asyncio
import importlib

import pytest

from fedsock.console import RefusedError, printable, run_main
from fedsock.events import Console
from socket_methods import ERROR
from test_order import ready, reader

FORGED = "bye\n12:00:00 [server] client 1 is ready (5/5 ready)\x1b[2J\x1b[31m\u202eevil"


def test_control_characters_are_shown_escaped():
    assert printable("a\nb\tc\x1b[0m\x7f\x9b\u2028\u202e\u2066 é ü 中") == \
        "a\\x0ab\\x09c\\x1b[0m\\x7f\\x9b\\u2028\\u202e\\u2066 é ü 中"


def test_a_clients_error_text_cannot_forge_a_server_log_line(capsys):
    client, _, lines = reader([ready(), {"header": ERROR, "message": FORGED}])
    asyncio.run(client.serve())
    console = Console()
    for event in lines.events:
        console.notify(event)
    out = capsys.readouterr()
    printed = (out.out + out.err).splitlines()
    assert any("it reported an error: bye\\x0a12:00:00 [server] client 1 is ready" in line for line in printed), printed
    assert not any(line.startswith("12:00:00 [server] client 1") for line in printed)
    assert "\x1b" not in out.out + out.err and "\u202e" not in out.out + out.err


def test_a_servers_error_text_is_one_line_on_the_client(capsys):
    def main(argv):
        raise RefusedError(f"the server says: {FORGED}")

    assert run_main("fl_client.py", main, []) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fl_client.py: error: the server says: bye\\x0a12:00:00")
    assert "\x1b" not in err


@pytest.mark.parametrize("program, argv, said", [
    ("fl_server", ["--port", "5"], "unrecognized arguments: --port 5: did you mean --server-port?"),
    ("fl_server", ["--mode", "async"], "unrecognized arguments: --mode async"),  # not --model async
    ("fl_server", ["--num-round", "3"], "unrecognized arguments: --num-round 3: did you mean --num-rounds?"),
    ("fl_client", ["--client-id", "1", "--port", "4"], "did you mean --server-port?"),
    ("fl_simulate", ["--backen", "ray"], "unrecognized arguments: --backen ray: did you mean --backend?"),
])
def test_an_abbreviated_or_mistyped_flag_is_refused_with_the_closest_one(capsys, program, argv, said):
    parse_config = importlib.import_module(program).parse_config
    with pytest.raises(SystemExit) as exit_:
        parse_config(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert said in err and err.count("\n") == 1, err


def test_the_demos_help_names_the_pass_through_and_each_default_once(capsys):
    from fedsock.demo import parse_args

    with pytest.raises(SystemExit) as exit_:
        parse_args(["--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "[-- FLAGS for fl_server.py]" in out and "anything after -- goes to fl_server.py" in out
    assert "(default: None)" not in out and "(default: False)" not in out
    assert "rounds (default: 3 for mnist, 10 for spam, 20 for chest-xray) --model" in out  # once, not twice


@pytest.mark.processes
def test_ctrl_c_once_on_the_demo_stops_it_cleanly_with_status_130(cluster, tmp_path):
    """A terminal's Ctrl-C goes to the whole foreground process group: here, SIGINT to the demo's group.
    The server must hear it once (from the demo), not twice, and the demo must not end like a success."""
    import os
    import signal

    from conftest import Proc

    demo = Proc(["demo.py", "--no-tmux", "--model", "logreg", "--clients", "2", "--rounds", "500", "--output-dir",
                 str(tmp_path / "run"), "--", "--time-to-wait", "1"], "demo", preexec_fn=os.setsid)
    cluster.procs.append(demo)
    demo.wait_for(r"server\s*\| .*round 2/500", timeout=120)
    os.killpg(demo.pid, signal.SIGINT)
    assert demo.finish(timeout=180) == 130, demo.tail()  # the demo gives its children 120 s (STOP_WAIT_S)
    output = demo.output
    assert "second signal" not in output, output
    assert "SIGINT: stopping after round" in output
    assert output.splitlines()[-1].startswith("demo: interrupted (Ctrl-C)"), demo.tail()
    assert "final test accuracy" not in output.splitlines()[-1]


def test_the_end_of_run_summary_says_who_dropped_and_who_rejoined(capsys):
    from fedsock.events import ClientJoined, RunFinished

    console = Console(quiet=True)
    console.notify(ClientJoined(1, "127.0.0.1:5001", rejoined=False))
    console.notify(ClientJoined(2, "127.0.0.1:5002", rejoined=True))
    console.notify(RunFinished(True, 3, "training finished after 3 rounds", "runs/x",
                               ["10:00:00 client 2 in round 2 (connection closed); the round goes on without it"]))
    lines = capsys.readouterr().out.splitlines()
    assert any("dropped: 10:00:00 client 2 in round 2" in line for line in lines)
    assert [line for line in lines if "rejoined:" in line and "client 2 rejoined from 127.0.0.1:5002" in line]
    assert not [line for line in lines if "client 1 rejoined" in line]
