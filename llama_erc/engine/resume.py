"""What may change across a resume, and what may not.

A resume must continue the same sequence of updates, so everything that decides it is compared with what the
checkpoint recorded, and a difference is refused with the field named:
- the run config (engine/config.py), except RESUME_MUTABLE: bookkeeping, the output directory (the checkpoint
  was found in it, whatever its spelling or location), and implementation choices that compute the same function;
- the global batch, micro_batch x grad_accum x processes. It decides the steps per epoch, the lr schedule and the
  data order. Its make-up may change (1 process x grad_accum 2 -> 2 processes x grad_accum 1, another
  micro-batch): every step then sees the same examples with the same normalisation (engine/batching.py), so the
  updates are the same up to summation order; with LoRA dropout on, the masks are drawn per process and differ;
- the training examples, as a fingerprint per dataset (data.fingerprint): the count and a SHA-256 of the token ids
  and labels (and of the loss weight of every example whose weight is not 1, e.g. --aux_impact's, so another alpha
  differs).
"""
from __future__ import annotations

from pathlib import Path

RESUME_MUTABLE = {"resume", "log_every", "save_every", "keep_last", "eval_every", "eval_max_examples",
                  "eval_batch_size", "device", "kernels", "activation_checkpointing", "fused_lora",
                  "packed_attention", "cuda_graphs", "out_dir",
                  "micro_batch", "grad_accum"}  # the last two: only their product with the processes is fixed


def batch_record(micro_batch: int, grad_accum: int, world_size: int) -> dict:
    return {"micro_batch": micro_batch, "grad_accum": grad_accum, "world_size": world_size,
            "global_batch": micro_batch * grad_accum * world_size}


def check_resume(saved: dict, current: dict, path: Path, defaults: dict) -> list[str]:
    """Refuse (ValueError) a resume that would not continue the checkpoint's run; returns warnings to print.

    saved, current: run records {"train": config fields, "batch": batch_record, "data": {dataset: fingerprint}}.
    A config field the checkpoint predates counts as its default (`defaults`); a checkpoint without a batch or
    data record (written before they existed) is checked as far as it can be, with a warning.
    """
    train = {**defaults, **saved["train"]}
    diff = {k: (train.get(k), v) for k, v in current["train"].items()
            if k not in RESUME_MUTABLE and _norm(train.get(k)) != _norm(v)}
    if diff:
        lines = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in sorted(diff.items()))
        raise ValueError(f"cannot resume from {path}: the run config changed ({lines})")
    return _check_batch(saved.get("batch"), current["batch"], train, path) + \
        _check_data(saved.get("data"), current["data"], path)


def _check_batch(old: dict | None, now: dict, saved_train: dict, path: Path) -> list[str]:
    if old is None:  # the process count it was written with is unknown: its make-up must stay as it was
        for k in ("micro_batch", "grad_accum"):
            if saved_train[k] != now[k]:
                raise ValueError(f"cannot resume from {path}: {k}: checkpoint {saved_train[k]} vs now {now[k]} (the "
                                 "checkpoint predates the global batch record, so its make-up cannot change)")
        return [f"warning: {path} does not record its number of processes; the global batch is unchanged only if "
                f"it was written by {now['world_size']} as well"]
    if old["global_batch"] != now["global_batch"]:
        per_rank = now["micro_batch"] * now["world_size"]
        hint = (f" (here: --grad_accum {old['global_batch'] // per_rank})" if old["global_batch"] % per_rank == 0
                else "")
        raise ValueError(f"cannot resume from {path}: the global batch changed from {old['global_batch']} "
                         f"({_makeup(old)}) to {now['global_batch']} ({_makeup(now)}). It decides the steps per "
                         "epoch, the lr schedule and the data order; keep micro_batch x grad_accum x processes "
                         f"at {old['global_batch']}{hint}")
    return []


def _makeup(b: dict) -> str:
    procs = f"{b['world_size']} process" + ("es" if b["world_size"] != 1 else "")
    return f"micro_batch {b['micro_batch']} x grad_accum {b['grad_accum']} x {procs}"


def _check_data(old: dict | None, now: dict, path: Path) -> list[str]:
    if old is None:
        return [f"warning: {path} predates training-data fingerprints; the data could not be checked"]
    for name in sorted(set(old) | set(now)):
        if old.get(name) != now.get(name):
            raise ValueError(f"cannot resume from {path}: the training data of {name} changed (checkpoint: "
                             f"{_describe(old.get(name))}; now: {_describe(now.get(name))})")
    return []


def _describe(fp: dict | None) -> str:
    return "absent" if fp is None else f"{fp['examples']} examples, sha256 {fp['sha256'][:16]}"


def _norm(v):
    return list(v) if isinstance(v, tuple) else v
