"""Where a measurement's commit comes from: git here, GIT_COMMIT on a tree copied without .git."""
import subprocess

import pytest

from engine import provenance


def test_commit_from_git_here():
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=provenance.ROOT)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    assert provenance.source_commit() == head.stdout.strip()
    assert provenance.source_dirty() in (True, False)


def test_commit_from_environment_without_git(monkeypatch):
    monkeypatch.setattr(provenance, "ROOT", provenance.ROOT.parent / "no-such-checkout")
    monkeypatch.setenv("GIT_COMMIT", "abc123")
    assert provenance.source_commit() == "abc123"
    assert provenance.source_dirty() is None
    monkeypatch.delenv("GIT_COMMIT")
    assert provenance.source_commit() is None
