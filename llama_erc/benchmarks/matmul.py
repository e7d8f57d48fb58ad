"""The measured dense matmul rate that bench.py divides model FLOPs by (MFU)."""
from __future__ import annotations

import time

import torch

from llama_erc.benchmarks.hf_baseline import sync


def matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Measured dense matmul rate (TFLOP/s): best of several n^3 GEMMs (n = 8192 on CUDA, 512 on CPU)."""
    n = 8192 if device.type == "cuda" else 512
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    times = []
    for i in range(13):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        if i >= 3:  # the first calls pick kernels and warm clocks
            times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times) / 1e12
