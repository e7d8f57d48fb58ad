"""Shared test set-up. Must run before anything imports `kernels`: @triton.jit picks the interpreter
when the decorator runs, i.e. at import time. `make test` also exports TRITON_INTERPRET=1."""
import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"  # ../shared beside the checkout: real data and the LLaMA 2 tokenizer


@pytest.fixture
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def shared_dir() -> Path:
    return SHARED


@pytest.fixture
def llama2_tokenizer_path() -> Path:
    path = SHARED / "tokenizer" / "llama2" / "tokenizer.model"
    if not path.exists():
        pytest.skip(f"LLaMA 2 tokenizer not present at {path}")
    return path


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped on CPU")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
