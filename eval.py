"""Evaluate a fine-tuned run on an ERC split: `python eval.py --run runs/meld --data meld=DIR --split test`.

Writes predictions.csv (with label probabilities), report.json, report.txt and confusion.png; every flag is a
field of llama_erc.engine.config.EvalConfig (`python eval.py --help`). Installed as `llama-erc-eval` too.
"""
from llama_erc.engine.eval_run import main

if __name__ == "__main__":
    raise SystemExit(main())
