"""Training and evaluation throughput, this engine vs transformers + PEFT: `python bench.py --mode erc|fixed ...`

See llama_erc/benchmarks/bench.py for what is measured and how; installed as `llama-erc-bench` too.
"""
from llama_erc.benchmarks.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
