"""Evaluate a fine-tuned run on an ERC split: `python eval.py --run runs/meld --data meld=DIR --split test`.

Writes predictions.csv (with label probabilities), report.json, report.txt and confusion.png; every flag
is a field of engine.config.EvalConfig (`python eval.py --help`).
"""
from __future__ import annotations

import sys

from engine.config import EvalConfig, parse_config


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_config(EvalConfig, argv)
        from engine.eval_run import run_eval
        run_eval(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
