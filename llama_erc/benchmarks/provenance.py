"""Which source a measurement ran: the git commit, and whether tracked files differed from it; and the paths
a results file records, relative to the repository (`repo_relative`, `path_label`), so that it names no machine's
directories.

A lent GPU machine receives a copy of the working tree without its .git, so there the commit comes from the
GIT_COMMIT environment variable (scripts/gpu_session.sh documents passing it) and dirtiness is unknown (None).
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

# The checkout this package runs from (llama_erc/ sits in the repository root); results files name paths relative
# to it. For an installed copy outside a checkout, the current directory.
_PARENT = Path(__file__).resolve().parents[2]
ROOT = _PARENT if (_PARENT / "setup.py").is_file() else Path.cwd()


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


def repo_relative(path: str | Path, root: Path = ROOT) -> str:
    """`path` relative to the repository root with POSIX separators, as results files record paths:
    'runs/meld_tiny' inside the repository, '../shared/data/meld' outside it. A relative `path` is taken from
    the current directory, as a command-line argument is; the path is normalised lexically (symlinks are not
    followed, so a linked data directory keeps the name it was given)."""
    return Path(os.path.relpath(os.path.abspath(path), os.path.abspath(root))).as_posix()


def path_label(path: str | Path, root: Path = ROOT) -> str:
    """A path as a report names it: relative to the repository inside it, its own name outside."""
    rel = repo_relative(path, root)
    return Path(os.path.abspath(path)).name if rel.split("/")[0] == ".." else rel
