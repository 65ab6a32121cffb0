"""The documentation against the code, so that the two cannot drift apart: the site builds in
strict mode (a broken link or anchor, a page left out of the navigation fail it); the flag
reference against the programs' parsers; metrics.csv's columns and the exit codes against their
definitions; every module on the architecture's map; the README stays a landing page. (The tutorials' commands are run by tests/test_tutorials.py; the protocol's rules and quoted
texts are checked by tests/test_protocol_doc.py.)"""

from __future__ import annotations

import importlib
import re

from conftest import ROOT
from fedsock.console import ExitStatus
from fedsock.generated_docs import PROGRAMS, pages
from fedsock.run_files import METRIC_COLUMNS

for _, module in PROGRAMS:  # at collection: their imports (torch's among them) may start a process
    importlib.import_module(module)
README = (ROOT / "README.md").read_text()
DOCS = ROOT / "docs"


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_the_generated_pages_are_up_to_date():
    """docs/reference/flags.md is written from the parsers, docs/index.md from the README: a flag added,
    renamed or changed, or a README edited, without them fails here."""
    for path, text in pages(ROOT).items():
        assert path.read_text() == text, f"{path.relative_to(ROOT)} is stale: python -m fedsock.generated_docs"


def table(page: str, name: str) -> list[list[str]]:
    text = (DOCS / "reference" / page).read_text()
    section = text[text.index(f"<!-- {name}: start") : text.index(f"<!-- {name}: end -->")]
    return [cells(line) for line in section.splitlines()[3:] if line.startswith("|")]


def test_every_metrics_column_is_documented_in_order():
    assert [row[0].strip("`") for row in table("metrics.md", "metrics columns")] == list(METRIC_COLUMNS)
    assert all(row[1] for row in table("metrics.md", "metrics columns"))


def test_every_exit_status_is_documented():
    assert [(int(row[0]), row[1].strip("`")) for row in table("exit-codes.md", "exit codes")] == [
        (int(status), status.name) for status in ExitStatus]


def test_no_page_has_a_placeholder_left():
    """Sections are drafted with a marker line (STRATEGY_BENCH, NET_TABLE) where measured figures go."""
    for page in [ROOT / "README.md", *DOCS.rglob("*.md")]:
        left = re.findall(r"^[A-Z]+(?:_[A-Z]+)*_(?:BENCH|TABLE)$", page.read_text(), re.M)
        assert not left, (page, left)


def test_the_readme_is_a_landing_page_with_the_two_commands_first():
    lines = README.splitlines()
    assert len(lines) <= 300, f"the README has {len(lines)} lines: it is a landing page, the rest goes in docs/"
    first_block = README[README.index("```bash") : README.index("```", README.index("```bash") + 3)]
    assert "demo.py" in first_block and "bash .ci/run" in first_block
    for link in re.findall(r"\]\((docs/[^)#]+)", README):
        assert (ROOT / link).exists(), f"the README links to {link}, which is not there"


def test_the_site_builds_in_strict_mode(tmp_path):
    """As CI builds it: every page in the navigation, every link and anchor resolving, no warning."""
    from mkdocs.commands.build import build
    from mkdocs.config import load_config

    config = load_config(str(ROOT / "mkdocs.yml"), site_dir=str(tmp_path / "site"), strict=True)
    build(config)
    assert (tmp_path / "site" / "reference" / "protocol" / "index.html").exists()
    assert (tmp_path / "site" / "search" / "search_index.json").exists()


def test_every_module_has_its_row_in_the_architecture():
    """A newcomer finds each concern by its file name: every module of the package is on the map."""
    page = (DOCS / "explanations" / "architecture.md").read_text()
    missing = [f"fedsock/{path.name}" for path in sorted((ROOT / "fedsock").glob("*.py"))
               if path.name != "__init__.py" and f"| `fedsock/{path.name}` |" not in page]
    assert not missing, f"not in docs/explanations/architecture.md: {missing}"
