"""The tree keeps the shape a newcomer can carry on: the core never imports the built-in world, every source
file reads in one sitting (at most 600 lines), and the README stays a short user's guide."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "chatsmith"


def test_core_never_imports_the_world():
    code = ("import sys, chatsmith.train, chatsmith.eval, chatsmith.chat, chatsmith.data, chatsmith.generate, "
            "chatsmith.model, chatsmith.cli\n"
            "print(sorted(m for m in sys.modules if m.startswith('chatsmith.world')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_no_source_file_over_600_lines():
    long = {str(p.relative_to(ROOT)): n for p in SRC.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 600}
    assert not long, long


def test_readme_is_a_short_guide_with_its_first_command_early():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200
    first_command = next(i for i, line in enumerate(lines) if re.match(r"\s*(pip|python|chatsmith|git)\s", line))
    assert first_command < 30


def test_no_issue_numbers_in_code_or_docs():
    paths = [*SRC.rglob("*.py"), ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "benchmarks").glob("*.md"),
             *(ROOT / "benchmarks").glob("*.py")]
    hits = [f"{p.relative_to(ROOT)}:{i + 1}" for p in paths
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines())
            if re.search(r"\bissues? #?\d+", line, re.IGNORECASE)]
    assert not hits, hits
