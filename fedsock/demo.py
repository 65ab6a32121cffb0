"""A whole federation on this machine: the server and five clients, started for you.

    python demo.py                          # 5 clients, 3 rounds of the default CNN on MNIST
    python demo.py --rounds 5 --model logreg
    python demo.py -- --partition dirichlet --alpha 0.3    # anything after -- goes to fl_server.py
    python demo.py --task spam              # each client its own SMS messages: a spam detector
    python demo.py --task chest-xray        # each client its own chest_xray/ folders of PNG X-rays
    python demo.py --dashboard              # the live dashboard at http://127.0.0.1:8765/?token=...: press Start there

In a terminal with tmux installed, every process gets a pane of its own (made for
recording); otherwise their lines are interleaved here, each labelled with its
process. Either way the run ends by itself and the final accuracy is printed.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from fedsock.console import ArgumentParser, FedsockError, HelpFormatter


def program(module: str) -> str:
    """The file of fl_server.py or fl_client.py, in a checkout or an installed fedsock alike."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise SystemExit(f"demo: cannot find {module}.py (is fedsock installed?)")
    return spec.origin


ROOT = Path.cwd()
COLOURS = ["\033[1;36m", "\033[32m", "\033[33m", "\033[35m", "\033[34m", "\033[31m"]
RESET = "\033[0m"
INTERRUPTED = 130  # Ctrl-C's exit status, as every fedsock program
STOP_WAIT_S = 120  # after a Ctrl-C: how long the server and clients get to stop cleanly, all together
HOLD_S = 20  # how long tmux panes stay on screen after the run, to read the last lines
DASHBOARD_LINK = re.compile(r"dashboard: (http://\S+)")  # the server's line: its link carries the run's token


# What each demo task trains, by default (the flags after `--` go to the server and win).
TASKS = {
    "mnist": dict(rounds=3, model="cnn", flags=[]),
    "spam": dict(rounds=10, model="textcnn", flags=["--local-epochs", "2", "--lr", "0.1"]),
    "chest-xray": dict(rounds=20, model="cnn", flags=["--local-epochs", "2", "--lr", "0.05"]),
}


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="demo.py", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter,
                            usage="%(prog)s [options] [-- FLAGS for fl_server.py]",
                            epilog="examples:\n" + __doc__.split("\n\n")[1] + "\n\n" + __doc__.split("\n\n")[2])
    parser.add_argument("--task", choices=tuple(TASKS), default="mnist",
                        help="mnist: the server splits MNIST; spam: each client its own SMS messages (a .tsv); "
                             "chest-xray: each client its own chest_xray/ image folders")
    parser.add_argument("--clients", type=int, default=5, help="number of clients to start")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default: 3 for mnist, 10 for spam, 20 for chest-xray)")
    parser.add_argument("--model", choices=("logreg", "mlp", "cnn", "textcnn", "textgru"), default=None,
                        help="model to train (default: cnn, or textcnn for spam)")
    parser.add_argument("--split", choices=("iid", "dirichlet"), default="iid",
                        help="spam: how the messages are dealt to the clients (dirichlet: very different spam rates)")
    parser.add_argument("--alpha", type=float, default=0.5, help="spam --split dirichlet: its concentration")
    parser.add_argument("--output-dir", default=None, help="run folder (default: runs/demo-<timestamp>)")
    parser.add_argument("--no-tmux", action="store_true", help="labelled lines here even when tmux is available")
    parser.add_argument("--dashboard", type=int, nargs="?", const=8765, default=None, metavar="PORT",
                        help="open the live dashboard at http://127.0.0.1:PORT/ (default port 8765): training starts "
                             "when you press Start training there, and more rounds can follow until you press Stop")
    return parser


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    args.rounds = args.rounds or TASKS[args.task]["rounds"]
    args.model = args.model or TASKS[args.task]["model"]
    if not 1 <= args.clients <= 64 or args.rounds < 1:
        parser.error("--clients must be 1..64 and --rounds at least 1")
    if args.dashboard is not None and not 1 <= args.dashboard <= 65535:
        parser.error("--dashboard PORT must be 1..65535")
    return args, extra


def prepare(args: argparse.Namespace, output_dir: Path, extra: list[str]) -> tuple[list[str], dict[int, list[str]]]:
    """The server's extra flags and each client's: for spam and chest-xray, the data is first written
    into the run's folder, one share per client, as that client's own files."""
    from fedsock.demo_data import prepare_chest_xray, prepare_spam

    flags = [*TASKS[args.task]["flags"], *extra]
    if args.task == "chest-xray" and args.model == "cnn":  # a linear model only loses by it (docs: Your own data)
        flags += ["--augment", "affine"]
    if args.task == "mnist":
        return flags, {k: [] for k in range(1, args.clients + 1)}
    data = output_dir / "data"
    prepared = (prepare_spam(data, args.clients, split=args.split, alpha=args.alpha) if args.task == "spam"
                else prepare_chest_xray(data, args.clients))
    print(f"demo: {prepared.summary}; files in {data}/", flush=True)
    at = prepared.server_flags.index("--model")  # the demo's --model decides, not the data's default
    server = [*prepared.server_flags[:at], *prepared.server_flags[at + 2:], *flags]
    return server, {k: ["--data", str(path)] for k, path in enumerate(prepared.client_data, start=1)}


def server_command(args: argparse.Namespace, port: int, output_dir: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-u", program("fl_server"), "--server-port", str(port), "--num-clients", str(args.clients),
            "--num-rounds", str(args.rounds), "--model", args.model, "--output-dir", str(output_dir), *extra]


def client_command(client_id: int, port: int, quiet: bool, flags: list[str]) -> list[str]:
    return [sys.executable, "-u", program("fl_client"), "--client-id", str(client_id), "--server-port", str(port),
            # Interleaved lines cannot hold a progress bar: a line per client each quarter of its training instead.
            *(["--quiet", "--progress-every", "25"] if quiet else []), *flags]


def pump(proc: subprocess.Popen, label: str, colour: str, tty: bool, ready: threading.Event | None = None,
         found: list | None = None, dashboard: bool = False) -> None:
    """Copy a process's lines here, each prefixed with its label (and open the server's dashboard link)."""
    prefix = f"{colour}{label:<9}|{RESET} " if tty else f"{label:<9}| "
    for line in proc.stdout:
        if ready is not None and not ready.is_set() and "listening on " in line:
            found.append(int(line.rsplit("listening on ", 1)[1].split()[0].rsplit(":", 1)[1]))
            ready.set()
        print(prefix + line.rstrip("\n"), flush=True)
        if dashboard and (link := DASHBOARD_LINK.search(line)):
            open_page(link.group(1))
    if ready is not None:
        ready.set()  # the server ended before listening: the caller sees no port


def run_labelled(args: argparse.Namespace, output_dir: Path, extra: list[str], client_flags: dict[int, list[str]],
                 stop_is_ok: bool = False) -> int:
    tty = sys.stdout.isatty()
    # Each child in a process group of its own: a terminal's Ctrl-C reaches the demo alone, which passes one
    # SIGINT to the server (that then tells its clients). Otherwise the server would get the terminal's and
    # the demo's, and take the second for "exit at once".
    server = subprocess.Popen(server_command(args, 0, output_dir, extra), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, cwd=ROOT, process_group=0)
    procs, threads, ready, port = [server], [], threading.Event(), []
    threads.append(threading.Thread(target=pump, args=(server, "server", COLOURS[0], tty, ready, port,
                                                       args.dashboard is not None)))
    threads[0].start()
    try:
        if not ready.wait(timeout=180) or not port:
            print("demo: the server did not start; see its lines above", file=sys.stderr)
            return 1
        for k in range(1, args.clients + 1):
            client = subprocess.Popen(client_command(k, port[0], True, client_flags[k]), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, cwd=ROOT, process_group=0)
            procs.append(client)
            threads.append(threading.Thread(target=pump, args=(client, f"client {k}", COLOURS[k % len(COLOURS)], tty)))
            threads[-1].start()
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        server.send_signal(signal.SIGINT)  # the server tells its clients and keeps its checkpoint
        deadline = time.monotonic() + STOP_WAIT_S
        for p in procs:
            try:
                p.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:  # the finally below ends it; say so rather than hang
                print(f"demo: a process (pid {p.pid}) had not ended {STOP_WAIT_S} s after the Ctrl-C: ended it",
                      file=sys.stderr)
        return INTERRUPTED
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for t in threads:
            t.join(timeout=10)
    if stop_is_ok and codes[0] == 130:  # the dashboard's Stop in the middle of a session
        codes[0] = 0
    return 0 if all(code == 0 for code in codes) else 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_in_tmux(args: argparse.Namespace, output_dir: Path, extra: list[str],
                client_flags: dict[int, list[str]]) -> int | None:
    """One tmux pane per process, tiled; attach, and return when every pane has ended."""
    session, port = f"fedsock-demo-{os.getpid()}", free_port()
    hold = f"; echo; echo '[demo] done; this pane closes in {HOLD_S} s'; sleep {HOLD_S}"
    commands = [shlex.join(server_command(args, port, output_dir, extra)) + hold]
    commands += [shlex.join(client_command(k, port, False, client_flags[k])) + hold for k in range(1, args.clients + 1)]
    size = shutil.get_terminal_size((200, 50))
    server_pane = subprocess.run(["tmux", "new-session", "-d", "-P", "-F", "#{pane_id}", "-s", session, "-x",
                                  str(size.columns), "-y", str(size.lines), "-c", str(ROOT), commands[0]],
                                 check=True, capture_output=True, text=True).stdout.strip()
    if args.dashboard is not None:
        threading.Thread(target=open_from_pane, args=(server_pane,), daemon=True).start()
    for command in commands[1:]:
        subprocess.run(["tmux", "split-window", "-t", session, "-c", str(ROOT), command], check=True)
        subprocess.run(["tmux", "select-layout", "-t", session, "tiled"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["tmux", "set-option", "-t", session, "pane-border-status", "top"], stdout=subprocess.DEVNULL)
    subprocess.run(["tmux", "attach-session", "-t", session])
    if subprocess.run(["tmux", "has-session", "-t", session], stderr=subprocess.DEVNULL).returncode == 0:
        print(f"demo: detached; the federation goes on in tmux session {session} (tmux attach -t {session})")
        return None
    return 0


def report(output_dir: Path) -> int:
    metrics = output_dir / "metrics.csv"
    if not metrics.exists():
        print(f"demo: no round finished; see {output_dir}", file=sys.stderr)
        return 1
    with open(metrics) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        print(f"demo: no round finished; see {output_dir}", file=sys.stderr)
        return 1
    last = rows[-1]
    scores = f"final test accuracy {100 * float(last['test_accuracy']):.2f}%" if last.get("test_accuracy") else \
        f"final accuracy on the clients' test splits {100 * float(last['fed_accuracy']):.2f}%"
    if last.get("test_f1"):
        scores += (f", precision {float(last['test_precision']):.3f}, recall {float(last['test_recall']):.3f}, "
                   f"F1 {float(last['test_f1']):.3f}")
    print(f"\n{scores} after {last['round']} rounds with {last['clients']} clients; metrics, model and plot in "
          f"{output_dir}/")
    return 0


def open_page(link: str, tell: bool = True) -> None:
    """The server printed its dashboard's link, with the run's token, once the page is up: say where it is,
    and open it in a browser where there is a screen (the link sets the token's cookie)."""
    if tell:
        print(f"demo: the dashboard is at {link}: press Start training there once the clients are in; "
              f"Stop ends the demo", flush=True)
    if os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY") or sys.platform == "darwin":
        import webbrowser

        threading.Thread(target=webbrowser.open, args=(link,), daemon=True).start()


def open_from_pane(pane: str) -> None:
    """tmux: the link is in the server's pane, where the user reads it; open it from there (a line here
    would scribble over tmux's screen). The server loads its data first: up to three minutes."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        shown = subprocess.run(["tmux", "capture-pane", "-p", "-J", "-S", "-", "-t", pane], capture_output=True,
                               text=True).stdout  # -J: a long link wrapped in a narrow pane is one line again
        if link := DASHBOARD_LINK.search(shown):
            open_page(link.group(1), tell=False)
            return
        time.sleep(0.2)  # polling a pane for a convenience: bounded, and nothing waits on it


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    output_dir = Path(args.output_dir or ROOT / "runs" / time.strftime("demo-%Y%m%d-%H%M%S")).resolve()
    use_tmux = (not args.no_tmux and shutil.which("tmux") and sys.stdin.isatty() and sys.stdout.isatty()
                and "TMUX" not in os.environ)
    try:
        server_flags, client_flags = prepare(args, output_dir, extra)
    except FedsockError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 2
    if args.dashboard is not None:  # its link is the server's to print: the token is made there
        server_flags += ["--dashboard", f"127.0.0.1:{args.dashboard}", "--start", "manual", "--stay"]
    status = (run_in_tmux(args, output_dir, server_flags, client_flags) if use_tmux
              else run_labelled(args, output_dir, server_flags, client_flags, stop_is_ok=args.dashboard is not None))
    if status is None:  # detached from tmux: the run is still going
        return 0
    if status == INTERRUPTED:
        print(f"demo: interrupted (Ctrl-C): the server stopped and kept what it had; see its last lines above "
              f"and {output_dir}/", file=sys.stderr)
        return INTERRUPTED
    return report(output_dir) or status


if __name__ == "__main__":
    sys.exit(main())
