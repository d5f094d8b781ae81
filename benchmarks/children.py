"""Helpers the side-by-side benchmarks share: run one side in a process of its own, and check for TRL.

    from children import have_trl, run_child
    result = run_child(__file__, "trl_grpo", work, ["--steps", "10"])   # the child's last stdout line, as JSON

Each side runs in a fresh process so one side's memory, threads and compiled kernels cannot help or hurt
the other's timing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def run_child(script: str, name: str, work: Path, argv: list[str]) -> dict | None:
    """Run ``script --child NAME --work WORK ARGV...``; its last stdout line parsed as JSON, or None (the
    child's stderr tail is printed) when it fails."""
    cmd = [sys.executable, str(Path(script).resolve()), "--child", name, "--work", str(work), *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"--- {name} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def have_trl() -> bool:
    """Whether TRL and `datasets` (the `bench` extra) are installed."""
    try:
        import datasets  # noqa: F401
        import trl  # noqa: F401
    except ImportError:
        return False
    return True
