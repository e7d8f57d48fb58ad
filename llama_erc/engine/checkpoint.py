"""Training checkpoints, the best adapters and the run record: written crash-safely, read back only when complete.

Layout:  <out_dir>/checkpoints/step_0000120/{adapters.safetensors, optimizer.pt, state.pt, config.json}
         <out_dir>/best -> .best-step_0000100-<id>/{adapters.safetensors, config.json}
A checkpoint is written into a temporary sibling directory, every file and the directory are fsynced, and the
directory is renamed into place; the rename is made durable (the parent is fsynced) before older checkpoints
are pruned, so a crash or power loss leaves either the new checkpoint complete or the previous ones intact.
`best` is a relative symlink to a complete directory, replaced by one atomic rename: a reader never sees new
adapters with an old config. A resume reads a checkpoint completely (`read_checkpoint`) before using it and
falls back to the previous one when the newest is damaged. The data position and the lr are functions of the
step (engine/batching.py, engine/optim.py), so step + RNG + optimizer state is everything a resume needs.

The run record is every checkpoint's and best/'s config.json, the one description of a run that resume
(engine/resume.py), eval.py and a later stage (--init_adapters) read:
    {"train": the TrainConfig fields (dtype as resolved), "model": the ModelConfig fields,
     "batch": the make-up of the global batch, "data": {dataset: data.fingerprint},
     "runtime": {"dtype", "dtype_reason"}, "leak": the leak guard's report (data/leaks.py),
     "base": {"quant": how the frozen base was held, "files"/"blake2b": its files' fingerprint}}
    (best/ adds "step" and "metrics"). Records written before "batch", "data", "runtime", "leak" or "base"
    existed are read as far as they go.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llama_erc.engine.config import TrainConfig
from llama_erc.engine.resume import batch_record
from llama_erc.engine.runtime import Runtime
from llama_erc.model.load import weights_fingerprint

CHECKPOINT_FILES = ("adapters.safetensors", "optimizer.pt", "state.pt", "config.json")
# What decides the adapters' shapes and scale: a later stage (--init_adapters) must match the earlier one on each
INIT_LORA_KEYS = ("lora_rank", "lora_alpha", "lora_targets")
_STEP_DIR = re.compile(r"step_(\d+)")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read back completely (truncated, empty or missing files)."""


@dataclass
class LoadedCheckpoint:
    """Everything a checkpoint holds, read into memory and checked; nothing applied to a model yet."""
    path: Path
    config: dict  # {"train": ..., "model": ..., "batch": ..., "data": ...} (older checkpoints: train + model)
    adapters: dict[str, torch.Tensor]
    optimizer: dict
    state: dict  # step, best metric, rng, ...


def run_record(cfg: TrainConfig, model_config, rt: Runtime, data_fingerprints: dict, leak: dict | None = None) -> dict:
    """The run record a run's checkpoints hold (module docstring)."""
    record = {"train": asdict(cfg), "model": asdict(model_config),
              "batch": batch_record(cfg.micro_batch, cfg.grad_accum, rt.world_size), "data": data_fingerprints,
              "runtime": {"dtype": rt.dtype_name, "dtype_reason": rt.dtype_reason},
              "base": base_record(cfg.model, cfg.base_quant)}
    return record if leak is None else {**record, "leak": leak}


def base_record(model: str, base_quant: str) -> dict:
    """The base the adapters trained on: how it was held (model/quant.py) and, for a checkpoint, its files'
    fingerprint (model.load.weights_fingerprint); a preset's random weights have none."""
    path = Path(model)
    return {"quant": base_quant, **(weights_fingerprint(path) if path.exists() else {"preset": model})}


def check_same_base(record: dict, run_model: str, model: str, base_quant: str, source: str | Path) -> None:
    """Refuse to score a run's adapters on another base than the quantized one they trained on: adapters trained
    on deq(Wq) are fit to those weights. A run on a dense base may be scored on any base (as before)."""
    trained = record.get("base", {})
    quant = trained.get("quant", record["train"].get("base_quant", "none"))
    if quant == "none":
        return
    if base_quant != quant:
        raise ValueError(f"{source}: the run's adapters trained on a {quant} base ({run_model}); scoring them with "
                         f"--base_quant {base_quant} would change the weights they were fit to")
    if "blake2b" in trained and Path(model).exists():
        now = weights_fingerprint(model)
        if now["blake2b"] != trained["blake2b"]:
            raise ValueError(f"{source}: the run's adapters trained on the {quant} base {run_model} "
                             f"(files {trained['files']}); {model} is another file (files {now['files']}, "
                             "fingerprints differ): pass the run's own base with --model")


def read_run_record(config_file: Path) -> dict:
    """A run record from a checkpoint's or best/'s config.json; ValueError naming the file when it is none."""
    try:
        record = json.loads(Path(config_file).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{config_file}: unreadable run record ({type(e).__name__}: {e})") from None
    if not _is_run_record(record):
        raise ValueError(f"{config_file}: not a run record (no 'train' section)")
    return record


def _is_run_record(obj) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("train"), dict)


def train_config_of(record: dict, source: str | Path) -> TrainConfig:
    """The TrainConfig a run record describes (JSON lists back to tuples); unknown fields are named."""
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(record["train"]) - known)
    if unknown:
        raise ValueError(f"{source}: the run record has fields this version does not know: {unknown}")
    return TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in record["train"].items()})


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _fsync(path: Path) -> None:
    """Flush a file's or a directory's data and metadata to the disk."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced_dir(directory: Path, adapters: dict[str, torch.Tensor], config: dict,
                      extra: dict[str, object] | None = None) -> None:
    """Write adapters.safetensors, config.json and `extra` ({file name: object for torch.save}) into
    `directory`, then fsync every file and the directory itself."""
    text = json.dumps(config, indent=2, sort_keys=True, default=str)  # serialise first: a failure writes nothing
    save_file(adapters, str(directory / "adapters.safetensors"))
    for name, obj in (extra or {}).items():
        torch.save(obj, directory / name)
    (directory / "config.json").write_text(text)
    for f in directory.iterdir():
        _fsync(f)
    _fsync(directory)


def remove_stale_temporaries(out_dir: str | Path) -> None:
    """Remove what an interrupted save left behind: `.step_*.tmp-*` directories, and `.step_*.old-*` ones whose
    replacement is in place (one whose replacement never landed is moved back)."""
    root = checkpoint_dir(out_dir)
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.name.startswith(".step_") and ".tmp-" in p.name:
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(".step_") and ".old-" in p.name:
            final = root / p.name[1:].split(".old-")[0]
            if final.exists():
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.replace(p, final)


def save_checkpoint(out_dir: str | Path, *, model: nn.Module, opt: torch.optim.Optimizer, state: dict,
                    config: dict, keep_last: int) -> Path:
    root = checkpoint_dir(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir)
    final = root / f"step_{state['step']:07d}"
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        _write_synced_dir(tmp, trainable_state(model), config,
                          {"optimizer.pt": opt.state_dict(), "state.pt": state})
        old = None
        if final.exists():  # re-saving a step: the old copy stays recoverable until the new one is in place
            old = root / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync(root)  # the rename is durable before anything older is deleted
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old)
    for stale in list_checkpoints(out_dir)[:-keep_last]:
        shutil.rmtree(stale)
    return final


def step_directories(out_dir: str | Path) -> list[Path]:
    """Every checkpoints/step_N directory, complete or not, oldest first (temporaries are ignored)."""
    root = checkpoint_dir(out_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if _STEP_DIR.fullmatch(p.name) and p.is_dir())


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Checkpoint directories with every file present and non-empty, oldest first. Their contents are checked
    only by `read_checkpoint`."""
    return [p for p in step_directories(out_dir)
            if all((p / f).is_file() and (p / f).stat().st_size > 0 for f in CHECKPOINT_FILES)]


def read_checkpoint(path: Path) -> LoadedCheckpoint:
    """Read and check every file of a checkpoint; CheckpointError names what is wrong."""
    try:
        config = json.loads((path / "config.json").read_text())
        adapters = load_file(str(path / "adapters.safetensors"))
        optimizer = torch.load(path / "optimizer.pt", weights_only=True)
        state = torch.load(path / "state.pt", weights_only=True)
    except Exception as e:  # a damaged file fails in any of several libraries' own ways
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    step = int(_STEP_DIR.fullmatch(path.name).group(1))
    problems = []
    if not _is_run_record(config):
        problems.append("config.json has no 'train' section")
    if not adapters:
        problems.append("adapters.safetensors holds no tensors")
    if not (isinstance(optimizer, dict) and {"state", "param_groups"} <= set(optimizer)):
        problems.append("optimizer.pt is not an optimizer state")
    if not (isinstance(state, dict) and state.get("step") == step and "rng" in state):
        problems.append(f"state.pt does not hold step {step} and the RNG state")
    if problems:
        raise CheckpointError(f"{path}: " + "; ".join(problems))
    return LoadedCheckpoint(path, config, adapters, optimizer, state)


def latest_valid_checkpoint(out_dir: str | Path, warn: Callable[[str], None]) -> LoadedCheckpoint | None:
    """The newest checkpoint that reads back completely. A damaged newer one is reported through `warn` and
    moved aside (to `.step_N.invalid-<time>`), so it is neither resumed from nor counted by --keep_last."""
    candidates = step_directories(out_dir)
    for path in reversed(candidates):
        try:
            return read_checkpoint(path)
        except CheckpointError as e:
            aside = path.with_name(f".{path.name}.invalid-{time.time_ns()}")
            os.replace(path, aside)
            warn(f"warning: skipping a damaged checkpoint ({e}); moved it to {aside}, "
                 "falling back to the previous one")
    if candidates:
        raise CheckpointError(f"{checkpoint_dir(out_dir)}: no checkpoint reads back completely (all moved aside); "
                              "start a new run or restore one by hand")
    return None


def copy_trainable(model: nn.Module, adapters: dict[str, torch.Tensor], source: str | Path) -> None:
    """Copy adapter tensors into the model's trainable tensors; keys and shapes must match exactly."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(adapters) != set(params):
        raise ValueError(f"{source}: missing {sorted(set(params) - set(adapters))}, "
                         f"unexpected {sorted(set(adapters) - set(params))}")
    for name, t in adapters.items():
        if params[name].shape != t.shape:
            raise ValueError(f"{source}: {name} has shape {tuple(t.shape)}, model expects "
                             f"{tuple(params[name].shape)}")
    with torch.no_grad():
        for name, t in adapters.items():
            params[name].copy_(t)


def load_trainable(model: nn.Module, file: Path) -> None:
    """Copy an adapters.safetensors into the model's trainable tensors; keys and shapes must match exactly."""
    if not file.is_file():
        raise ValueError(f"{file}: no such adapter file")
    copy_trainable(model, load_file(str(file)), file)


def find_adapters(run: Path, flag: str = "--run") -> tuple[Path, Path]:
    """(adapters.safetensors, config.json) of a run dir (best/ first, else newest checkpoint) or checkpoint dir."""
    for d in [run / "best", run] + list(reversed(list_checkpoints(run))):
        if (d / "adapters.safetensors").is_file() and (d / "config.json").is_file():
            return d / "adapters.safetensors", d / "config.json"
    raise ValueError(f"{flag} {run}: no adapters.safetensors with a config.json in it, its best/ or checkpoints/")


def init_adapters_file(path: str | Path, train: dict) -> Path:
    """The adapters.safetensors a new stage starts from (--init_adapters PATH, a run dir or a checkpoint dir),
    checked without loading the model: it exists, and the run that wrote it had the LoRA shape of `train` (the
    current config as a dict) on every INIT_LORA_KEYS field, else a ValueError names the field and both values."""
    run = Path(path)
    if not run.exists():
        raise ValueError(f"--init_adapters {run}: no such run or checkpoint directory")
    adapters, config_file = find_adapters(run, "--init_adapters")
    try:
        saved = read_run_record(config_file)["train"]
    except ValueError as e:
        raise ValueError(f"--init_adapters {e}") from None
    for key in INIT_LORA_KEYS:
        then, now = saved.get(key), train[key]
        if (tuple(then) if isinstance(then, list) else then) != now:  # JSON turns the targets tuple into a list
            raise ValueError(f"--init_adapters {run}: {key} was {then!r} in that run, {now!r} now; the LoRA "
                             f"shape must match ({', '.join(INIT_LORA_KEYS)})")
    return adapters


def apply_checkpoint(ckpt: LoadedCheckpoint, *, model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """Load a read checkpoint's adapters + optimizer state; returns its state dict (step, rng, ...)."""
    copy_trainable(model, ckpt.adapters, ckpt.path / "adapters.safetensors")
    opt.load_state_dict(ckpt.optimizer)
    return dict(ckpt.state)


def save_best(out_dir: str | Path, *, adapters: dict[str, torch.Tensor], config: dict, step: int) -> Path:
    """Make <out_dir>/best the given adapters + config in one atomic swap: a new complete directory, then a
    symlink renamed over `best`. Older best directories are removed afterwards."""
    out = Path(out_dir)
    new = out / f".best-step_{step:07d}-{time.time_ns()}"
    link = out / f".best-link-{os.getpid()}"
    best = out / "best"
    new.mkdir(parents=True)
    try:
        _write_synced_dir(new, adapters, config)
        if link.is_symlink():
            link.unlink()
        os.symlink(new.name, link)  # relative: the run directory can be moved or copied
        if best.is_dir() and not best.is_symlink():  # a run written before best/ was a link
            os.replace(best, out / f".best-legacy-{time.time_ns()}")
        os.replace(link, best)
        _fsync(out)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        if link.is_symlink():
            link.unlink()
        raise
    for p in out.iterdir():
        if p.name.startswith(".best-") and p.name != new.name:
            p.unlink() if p.is_symlink() else shutil.rmtree(p, ignore_errors=True)
    return new
