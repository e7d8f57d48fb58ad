"""Progress a person can watch: one line per step on stdout, the same fields in <out_dir>/metrics.jsonl."""
from __future__ import annotations

import json
import time
from pathlib import Path


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class MetricsLog:
    """Writes step records; only the main process constructs one with a path."""

    def __init__(self, path: Path | None, enabled: bool = True):
        self.enabled = enabled
        self.path = path
        if path is not None and enabled:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        if self.enabled and self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def step(self, *, step: int, total: int, loss: float, lr: float, gnorm: float, tokens_per_s: float,
             eta: float, peak_mem_gb: float, **extra) -> None:
        """tokens_per_s: the rate since the previous record; eta: seconds of training steps left (evaluations and
        checkpoints not counted)."""
        if not self.enabled:
            return
        print(f"step {step}/{total} | loss {loss:.4f} | lr {lr:.2e} | gnorm {gnorm:.3f} | "
              f"{tokens_per_s / 1000:.2f}k tok/s | eta {_fmt_duration(eta)} | mem {peak_mem_gb:.2f} GB", flush=True)
        self.write({"step": step, "loss": loss, "lr": lr, "grad_norm": gnorm, "tokens_per_s": tokens_per_s,
                    "eta_s": eta, "peak_memory_gb": peak_mem_gb, "time": time.time(), **extra})

    def info(self, msg: str) -> None:
        if self.enabled:
            print(msg, flush=True)
