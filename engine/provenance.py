"""Which source a measurement ran: the git commit, and whether tracked files differed from it.

A lent GPU machine receives a copy of the working tree without its .git, so there the commit comes from the
GIT_COMMIT environment variable (scripts/gpu_session.sh documents passing it) and dirtiness is unknown (None).
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _git(*cmd: str) -> str | None:
    try:
        out = subprocess.run(["git", *cmd], capture_output=True, text=True, timeout=10, cwd=ROOT)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def source_commit() -> str | None:
    return _git("rev-parse", "HEAD") or os.environ.get("GIT_COMMIT") or None


def source_dirty() -> bool | None:
    """True when tracked files differ from the commit; None where there is no git checkout to ask."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)
