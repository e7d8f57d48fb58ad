"""Benchmarks: what the engine costs, measured against the HF + PEFT baseline, with the provenance each result
file records. Results go to benchmarks/results/ at the repository root.

    bench.py          training and eval throughput, ours vs transformers + PEFT (`python bench.py`, the face)
    hf_baseline.py    the HF + PEFT system bench.py runs         matmul.py     the measured matmul rate (MFU)
    kernels.py        the per-kernel benchmark: Triton vs eager vs torch.compile (python -m ...kernels)
    train_memory.py   peak training memory at 7B (python -m ...train_memory)
    load_rss.py       peak RSS of load_pretrained (python -m ...load_rss)
    provenance.py     the commit a measurement ran, and repository-relative paths
"""
