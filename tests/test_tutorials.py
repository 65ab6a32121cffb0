"""The docs' commands, so that a changed flag breaks the build and not a reader.

- Every `python PROGRAM ...` line in a ```bash (or ```sh) block of the README and the docs is read by
  that program's own parser, and fl_server.py's, fl_client.py's and fl_simulate.py's checks of flags
  together (in-process, milliseconds): a renamed flag, a value out of range or a refused mix fails.
  Commands that are not meant to be typed as they stand (placeholders) go in ```text blocks.
- Every tutorial's "try it" block, a ```bash block right after a `<!-- run ... -->` comment, runs as a
  bash script in a fresh folder, as a reader would paste it (real processes on 127.0.0.1). The
  comment may shorten it: `<!-- run: fl_server.py --num-rounds 1; fedsock.attack --iterations 20 -->`
  appends those flags to each command of that program. fl_server.py and fl_client.py are given a
  free --server-port, and a `--dashboard PORT` a free port, so blocks can run side by side.
"""

from __future__ import annotations

import importlib
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from fedsock import check_data
from fedsock.console import FedsockError
from fedsock.generated_docs import PROGRAMS
from support import free_port

DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]  # every page a reader copies a command from
# what a reader types -> the module whose parser reads it (fl_client.py --check-data is fl_client.py's)
PARSERS = {program.split()[-1] if program.startswith("python -m") else program.split()[0]: module
           for program, module in PROGRAMS if "--check-data" not in program}
MODULES = {program: importlib.import_module(module) for program, module in PARSERS.items()}  # (torch: at collection)
CONFIGS = {"fl_server.py": MODULES["fl_server.py"], "fl_client.py": MODULES["fl_client.py"],
           "fl_simulate.py": MODULES["fl_simulate.py"]}  # their parse_config checks the flags together
COMMAND = re.compile(r"^\s*python3? (?:-m )?(\S+)")
RUN_TIMEOUT_S = 300
WAIT_EACH = 'for pid in $BACKGROUND; do wait "$pid"; done; BACKGROUND=""'  # set -e: a failed one ends the block


def blocks(page: Path, language: str = "(?:bash|sh)") -> list[tuple[str, str]]:
    """(the comment just before it, or "", the code) of every fenced block of `language` on the page."""
    text = page.read_text()
    found = re.finditer(r"(?:<!--(?P<note>[^>]*)-->\s*\n)?```" + language + r"\n(?P<code>.*?)\n```", text, re.S)
    return [((m["note"] or "").strip(), m["code"]) for m in found]


def logical_lines(code: str, heredocs: bool = False) -> list[str]:
    """Lines with their `\\` continuations joined; a heredoc's body is not commands: it is left out, or
    kept as it stands with `heredocs`."""
    lines, out, heredoc = code.split("\n"), [], None
    for line in lines:
        if heredoc:
            heredoc = None if line.strip() == heredoc else heredoc
            if heredocs:
                out.append(line)
            continue
        if out and out[-1].endswith("\\"):
            out[-1] = out[-1][:-1] + " " + line.strip()
        else:
            out.append(line)
        if match := re.search(r"<<-?'?(\w+)'?", line):
            heredoc = match[1]
    return out


def commands() -> list[tuple[str, str, list[str]]]:
    found = []
    for page in PAGES:
        for _, code in blocks(page):
            for line in logical_lines(code):
                match = COMMAND.match(line)
                if match and match[1] in PARSERS:
                    words = shlex.split(line, comments=True)
                    words = words[:-1] if words and words[-1] == "&" else words
                    start = words.index(match[1]) + 1
                    found.append((f"{page.relative_to(ROOT)}: {line.strip()}", match[1], words[start:]))
    return found


def test_the_docs_have_commands_to_check():
    """The parser check below is not vacuous: every program the tutorials teach is in it."""
    seen = {program for _, program, _ in commands()}
    assert {"fl_server.py", "fl_client.py", "fl_simulate.py", "demo.py", "fedsock.attack", "fedsock.audit",
            "fedsock.enrol", "fedsock.runs"} <= seen, seen


@pytest.mark.parametrize("where, program, argv", commands(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_command_in_the_docs_is_accepted_by_its_program(where, program, argv):
    offline = program == "fl_client.py" and any(a.split("=")[0] == "--check-data" for a in argv)
    parser = (check_data if offline else MODULES[program]).build_parser()  # fl_client.py hands it on so
    argv = argv[: argv.index("--")] if program == "demo.py" and "--" in argv else argv
    try:
        parser.parse_args(argv)
        if program in CONFIGS and not offline:  # then the program's own checks of the flags together
            try:
                CONFIGS[program].parse_config(argv)
            except FedsockError as exc:  # a file an earlier step makes (a checkpoint, a policy) is fine missing
                if "No such file or directory" not in str(exc):
                    pytest.fail(f"{where}: {program} refuses it: {exc}")
    except SystemExit as exc:
        pytest.fail(f"{where}: {program} refuses it (exit {exc.code})")


# --------------------------------------------------------------------------- the tutorials, run


def runnable() -> list[tuple[str, str, str]]:
    found = []
    for page in sorted((DOCS / "tutorials").glob("*.md")):
        for index, (note, code) in enumerate(blocks(page)):
            if note == "run" or note.startswith("run:"):
                found.append((f"{page.stem}-{index}", note.removeprefix("run").lstrip(":").strip(), code))
    return found


def test_every_tutorial_has_a_block_that_runs():
    pages = {name.rsplit("-", 1)[0] for name, _, _ in runnable()}
    assert pages == {page.stem for page in (DOCS / "tutorials").glob("*.md")}


def shortened(code: str, overrides: str) -> str:
    """The block as the test runs it: each program's overrides appended, free ports given."""
    extra = {}
    for part in filter(None, (p.strip() for p in overrides.split(";"))):
        program, _, flags = part.partition(" ")
        extra[program] = flags
    out = []
    for line in logical_lines(code, heredocs=True):
        match = COMMAND.match(line)
        if match and match[1] in PARSERS:
            command, background = line, ""
            if re.search(r"\s&\s*(#.*)?$", command):
                command, background = command[: command.rindex("&")], " &"
            command = re.sub(r"\s#.*$", "", command).rstrip()  # the reader's comment (not inside quotes here)
            if match[1] in ("fl_server.py", "fl_client.py") and "--check-data" not in command:
                command = re.sub(r"\s--server-port[ =]\d+", "", command) + " --server-port $FEDSOCK_PORT"
            command = re.sub(r"--dashboard[ =]\d+", "--dashboard $DASHBOARD_PORT", command)
            line = f"{command} {extra.get(match[1], '')}".rstrip() + background
        if line.rstrip().endswith("&"):
            line += ' BACKGROUND="$BACKGROUND $!"'
        elif line.strip() == "wait":  # bash's bare wait is 0 whatever the jobs did: wait for each, by PID
            line = WAIT_EACH
        out.append(line)
    return "\n".join(out)


def block_script(code: str, overrides: str = "") -> str:
    return 'set -euo pipefail\nBACKGROUND=""\n' + shortened(code, overrides) + "\n" + WAIT_EACH + "\n"


@pytest.mark.processes
@pytest.mark.parametrize("code", ["(exit 3) &\nwait\necho done", "(exit 3) &\necho done"])
def test_a_command_that_fails_in_the_background_fails_its_block(code):
    """bash's bare `wait`, and `jobs -p` once a job has ended, would both let it pass."""
    ran = subprocess.run(["bash", "-c", block_script(code)], capture_output=True, text=True, timeout=30)
    assert ran.returncode == 3, ran


@pytest.mark.processes
@pytest.mark.timeout(RUN_TIMEOUT_S + 30)
@pytest.mark.parametrize("name, overrides, code", runnable(), ids=lambda v: v if "\n" not in v and " " not in v else "")
def test_a_tutorial_s_block_runs_as_a_reader_pastes_it(name, overrides, code, tmp_path):
    bin_dir = tmp_path / ".bin"
    bin_dir.mkdir()
    for command in ("python", "python3"):  # this interpreter, its venv included (a symlink would lose the venv)
        (bin_dir / command).write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
        (bin_dir / command).chmod(0o755)
    for script in ("fl_server.py", "fl_client.py", "fl_simulate.py", "demo.py"):
        (tmp_path / script).symlink_to(ROOT / script)
    script = block_script(code, overrides)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FEDSOCK_PORT": str(free_port()),
           "DASHBOARD_PORT": str(free_port())}
    proc = subprocess.Popen(["bash", "-c", script], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the group this test started: the block's processes, no others
        output, _ = proc.communicate()
        pytest.fail(f"{name} did not finish within {RUN_TIMEOUT_S} s:\n{script}\n{output[-4000:]}")
    assert proc.returncode == 0, f"{name} failed (exit {proc.returncode}):\n{script}\n{output[-4000:]}"
    assert "Traceback" not in output, output[-4000:]
