"""tests/mutations.py's breaks stay ready to run between its runs (a full run takes over an hour, so
it runs seldom): each still applies to the code as it is now, names tests that exist, and has its
row in tests/MUTATIONS.md. Code that moves or a test that is renamed would otherwise show only at
the next run, as "pattern not found", or as targeted tests that fail on the unmodified copy."""

from __future__ import annotations

import re
import shutil

from conftest import ROOT
from mutations import BREAKS, apply


def test_every_break_applies_to_the_code_as_it_is_and_compiles(tmp_path):
    shutil.copytree(ROOT / "minigpt", tmp_path / "minigpt", ignore=shutil.ignore_patterns("__pycache__"))
    files = {path: path.read_text() for path in (tmp_path / "minigpt").rglob("*.py")}
    for brk in BREAKS:
        assert apply(brk, tmp_path) == [], brk.name  # (every edit matches, and the edited files still compile)
        for path, text in files.items():  # the code as it was, for the next break
            if path.read_text() != text:
                path.write_text(text)


def test_every_break_names_tests_that_exist():
    sources = {path.name: path.read_text(encoding="utf-8") for path in (ROOT / "tests").glob("test_*.py")}
    for brk in BREAKS:
        assert brk.tests, brk.name
        for node in brk.tests:
            file, _, test = node.partition("::")
            source = sources.get(file.removeprefix("tests/"), "") if file.startswith("tests/") else ""
            assert re.search(rf"^def {re.escape(test.partition('[')[0])}\(", source, re.MULTILINE), (brk.name, node)


def test_every_break_has_one_row_in_the_table_and_every_row_a_break():
    rows = re.findall(r"^\| `([^`]+)` \| .+ \| .+ \|$", (ROOT / "tests" / "MUTATIONS.md").read_text(encoding="utf-8"),
                      re.MULTILINE)
    names = [brk.name for brk in BREAKS]
    assert len(set(names)) == len(names)
    assert len(set(rows)) == len(rows)
    assert {"no row": set(names) - set(rows), "no break": set(rows) - set(names)} == {"no row": set(), "no break": set()}
