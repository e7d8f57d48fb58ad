"""Where a measurement's commit comes from: git here, GIT_COMMIT on a tree copied without .git; and the
repository-relative paths results files record."""
import subprocess

import pytest

from llama_erc.benchmarks import provenance


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


def test_repo_relative_inside_outside_and_from_the_current_directory(tmp_path, monkeypatch):
    root = tmp_path / "main"
    (root / "runs").mkdir(parents=True)
    assert provenance.repo_relative(root / "runs" / "meld_tiny", root) == "runs/meld_tiny"
    assert provenance.repo_relative(tmp_path / "shared" / "data" / "meld", root) == "../shared/data/meld"
    assert provenance.repo_relative(root / "runs" / ".." / "benchmarks" / "r.json", root) == "benchmarks/r.json"
    assert provenance.repo_relative(root, root) == "."
    monkeypatch.chdir(root / "runs")  # a relative argument is taken from where the command ran
    assert provenance.repo_relative("x/y", root) == "runs/x/y"
    assert provenance.repo_relative("../../shared/data/meld", root) == "../shared/data/meld"
    # the default root is this checkout
    assert provenance.repo_relative(provenance.ROOT / "bench.py") == "bench.py"


def test_path_label_relative_inside_the_repository_its_name_outside(tmp_path):
    root = tmp_path / "main"
    assert provenance.path_label(root / "runs" / "ckpt", root) == "runs/ckpt"
    assert provenance.path_label(tmp_path / "models" / "llama-2-7b-st", root) == "llama-2-7b-st"
    assert provenance.path_label(tmp_path, root) == tmp_path.name
