"""The commands the committed results files record still run: each train.py / eval.py command line in
benchmarks/results/*.json parses, flag for flag, into a valid config of today's train.py / eval.py."""
import json
import shlex
from pathlib import Path

import pytest

from llama_erc.engine.config import EvalConfig, TrainConfig, parse_config

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def _strings(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)
    elif isinstance(obj, str):
        yield obj


def _commands() -> list[tuple[str, str, list[str]]]:
    """(results file, face, its arguments) for every recorded train.py / eval.py command."""
    found = []
    for path in sorted(RESULTS.rglob("*.json")):
        for text in _strings(json.loads(path.read_text())):
            words = shlex.split(text) if ("train.py" in text or "eval.py" in text) and " --" in text else []
            for face in ("train.py", "eval.py"):
                if face in words:
                    found.append((path.name, face, words[words.index(face) + 1:]))
    return found


COMMANDS = _commands()


def test_results_record_commands():
    assert len(COMMANDS) >= 20 and {face for _, face, _ in COMMANDS} == {"train.py", "eval.py"}


@pytest.mark.parametrize("source,face,args", COMMANDS, ids=[f"{s}:{f}:{i}" for i, (s, f, _) in enumerate(COMMANDS)])
def test_recorded_command_parses(source, face, args):
    cfg = parse_config(TrainConfig if face == "train.py" else EvalConfig, args)
    assert cfg is not None
