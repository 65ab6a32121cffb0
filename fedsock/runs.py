"""`python -m fedsock.runs [FOLDER] [--dashboard [HOST:]PORT]`: the runs view without a federation.

As `tensorboard --logdir runs` does for its logs: it serves the run folders in FOLDER (default runs, where
runs go by default) with their settings and final numbers, compared on one chart (fedsock/run_history.py),
behind the same token, cookie and Host checks as the live dashboard, and prints its link once:

    12:00:00 [runs] dashboard: http://127.0.0.1:8090/runs?token=...

Ctrl-C stops it (exit 130); a bad flag is one line and exit 2.
"""

from __future__ import annotations

import asyncio
import errno
import sys
from pathlib import Path

from aiohttp import web

from fedsock.console import ArgumentParser, ExitStatus, UsageError, run_main, say, warn
from fedsock.dashboard import (SHOWN_SETTINGS, Access, answer_checked, is_address, machine_names, parse_address,
                               static_file)
from fedsock.run_history import RunsFolder, RunsView

PROG = "python -m fedsock.runs"
WHO = "runs"


async def serve(folder: Path, host: str, port: int, loopback: bool) -> None:
    """The runs view alone, until Ctrl-C: no federation, no live page."""
    access = Access()

    @web.middleware
    async def checks(request, handler):
        return await answer_checked(access, request, handler)

    async def home(request):
        raise web.HTTPSeeOther("/runs")

    app = web.Application(middlewares=[checks], client_max_size=64 * 1024)
    app.router.add_get("/", home)
    app.router.add_get("/static/{name}", static_file)
    RunsView(RunsFolder(folder, SHOWN_SETTINGS), live=False).add_routes(app.router)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, host, port, reuse_address=True).start()
        except OSError as exc:
            raise UsageError(f"--dashboard {host}:{port}: " + (f"port {port} is already in use; pick another"
                             if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc))) from None
        bound, port = runner.addresses[0][:2]
        shown = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(bound, f"[{bound}]" if ":" in bound else bound)
        url = f"http://{shown}:{port}/runs"
        names = {"localhost"} | ({host.lower()} if not is_address(host) else set())
        if not loopback:
            names |= machine_names()
            warn(WHO, f"the page listens beyond loopback ({host}): its token and the runs cross the network in "
                      f"clear; keep it on 127.0.0.1 beyond a trusted network (ssh -L)")
        access.opened(url.removesuffix("runs"), port, names)
        say(WHO, f"the runs in {folder.resolve()}: Ctrl-C to stop")
        say(WHO, f"dashboard: {url}?token={access.token}")
        await asyncio.Event().wait()  # until Ctrl-C
    finally:
        await runner.cleanup()


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=PROG, description="The runs view without a federation: the run folders in FOLDER, "
                                                   "their settings and final numbers, compared on one chart.")
    parser.add_argument("folder", nargs="?", default="runs",
                        help="the folder that holds the run folders (default: runs, where runs go by default)")
    parser.add_argument("--dashboard", default="8090", metavar="[HOST:]PORT",
                        help="where to serve the page (default: 8090, on 127.0.0.1; 0 picks a free port)")
    parser.add_argument("--traceback", action="store_true", help="show a full traceback on errors (for bug reports)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        host, port = parse_address(args.dashboard)
    except ValueError as exc:
        raise UsageError(f"--dashboard {exc}") from None
    folder = Path(args.folder)
    if not folder.is_dir():
        raise UsageError(f"{folder}: no such folder (give the folder that holds the run folders, e.g. runs)")
    loopback = host in ("localhost", "::1") or host.startswith("127.")
    try:
        asyncio.run(serve(folder, host, port, loopback))
    except KeyboardInterrupt:
        say(WHO, "stopped (Ctrl-C)")
        return ExitStatus.INTERRUPTED
    return ExitStatus.OK


def cli() -> int:
    return run_main(PROG, main)


if __name__ == "__main__":
    sys.exit(cli())
