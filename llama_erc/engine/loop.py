"""The training loop: one flat function, read top to bottom.

Per optimizer step:  lr from the step -> this rank's micro-batches of the global batch (engine/batching.py) ->
engine/step.py's train_step (right-padded rows, or with --packing several examples per row, engine/packing.py;
each loss summed over supervised tokens, sum_t w_t CE_t, and scaled by world_size / sum_t w_t over the whole
global batch -> DDP averages over ranks -> clip at grad_clip -> AdamW) -> log, evaluate, checkpoint. w_t is the
token's example's Sequence.weight: 1 for ERC, alpha (--aux_impact) for an auxiliary example, so the step's loss
(and the logged one) is the weighted mean sum w CE / sum w, which with every weight 1 is the plain mean over
supervised tokens. The data order, the lr and the dropout RNG are functions of (seed, step, rank), so a resumed
run continues exactly where the interrupted one stopped; what a resume may change is engine/resume.py's. A stop
signal (SIGINT/SIGTERM) to any rank is all-reduced with the step's loss, so every rank finishes the same step,
rank 0 checkpoints it and all of them return together.
"""
from __future__ import annotations

import signal
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from llama_erc.data import Sequence, fingerprint
from llama_erc.engine.batching import BatchPlan
from llama_erc.engine.checkpoint import (CheckpointError, apply_checkpoint, latest_valid_checkpoint, read_checkpoint,
                                         remove_stale_temporaries, run_record, save_best, save_checkpoint,
                                         step_directories, trainable_state)
from llama_erc.engine.config import TrainConfig
from llama_erc.engine.graphs import StepGraphs
from llama_erc.engine.log import MetricsLog
from llama_erc.engine.loss import SupervisedLoss
from llama_erc.engine.optim import lr_at, make_optimizer, set_lr, trainable_parameters
from llama_erc.engine.resume import check_resume
from llama_erc.engine.runtime import Runtime, peak_memory_gb, rng_state, set_rng_state
from llama_erc.engine.step import NonFiniteError, train_step

Evaluator = Callable[[nn.Module], dict]  # model -> metrics with at least "weighted_f1"


class _StopRequest:
    """SIGINT/SIGTERM set a flag; the loop (every rank, see train_loop) saves a checkpoint after the step in
    which any rank saw it, and returns."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "_StopRequest":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _Pace:
    """Seconds and tokens of the training steps this process ran: in all (for the ETA) and since the last
    window_rate() (the tokens/s a person watching the log wants, not an average diluted by the run's start)."""

    def __init__(self) -> None:
        self.steps, self.seconds, self.tokens = 0, 0.0, 0
        self._window_s, self._window_tokens = 0.0, 0

    def add(self, seconds: float, tokens: int) -> None:
        self.steps += 1
        self.seconds += seconds
        self.tokens += tokens
        self._window_s += seconds
        self._window_tokens += tokens

    def window_rate(self) -> float:
        rate = self._window_tokens / max(self._window_s, 1e-9)
        self._window_s, self._window_tokens = 0.0, 0
        return rate

    def mean_step_s(self) -> float:
        return self.seconds / max(1, self.steps)


def _reseed(seed: int, step: int, rank: int) -> None:
    # dropout masks become a function of (seed, step, rank): exact resume on every rank, distinct across ranks
    torch.manual_seed((seed * 1_000_003 + step * 7919 + rank) % (2**63))


def train_loop(cfg: TrainConfig, rt: Runtime, model: nn.Module, model_config, train_seqs: list[Sequence],
               pad_id: int, evaluator: Evaluator | None = None, data_fingerprints: dict | None = None,
               leak: dict | None = None) -> dict:
    """Train the adapters of `model` on `train_seqs`; returns the final state (step, best metric, ...).

    data_fingerprints: {dataset: data.fingerprint(its examples)}, recorded in checkpoints so that a resume on
    changed data is refused; default: one entry, "train", for `train_seqs` as a whole. leak: the leak guard's
    report (data.LeakReport.to_json), recorded beside them.
    """
    out = Path(cfg.out_dir)
    log = MetricsLog(out / "metrics.jsonl", enabled=rt.is_main)
    plan = BatchPlan(len(train_seqs), cfg.micro_batch, cfg.grad_accum, rt.world_size, cfg.seed)
    total_steps = cfg.max_steps or cfg.epochs * plan.steps_per_epoch
    record = run_record(cfg, model_config, rt, data_fingerprints or {"train": fingerprint(train_seqs)}, leak)
    params = trainable_parameters(model)
    opt = make_optimizer(params, cfg.optim)

    state = {"step": 0, "best_weighted_f1": -1.0, "best_step": -1}
    ckpt = _checkpoint_to_resume(out, rt, log) if cfg.resume else None
    if ckpt is not None:  # every rank checks the same record, so all refuse together
        for warning in check_resume(ckpt.config, record, ckpt.path, defaults=asdict(TrainConfig())):
            log.info(warning)
        state = apply_checkpoint(ckpt, model=model, opt=opt)
        set_rng_state(state.pop("rng"))
        log.info(f"resumed from {ckpt.path} at step {state['step']}")
    elif not cfg.resume and step_directories(out):
        raise ValueError(f"{out} already holds checkpoints ({step_directories(out)[-1].name}); pass --resume to "
                         "continue or choose another --out_dir")
    loss_fn: nn.Module = SupervisedLoss(model)
    if rt.distributed:
        loss_fn = DistributedDataParallel(loss_fn, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None)
    # --cuda_graphs: fixed-shape batches (cfg.layout) everywhere, captured and replayed on CUDA only
    graphs = StepGraphs(loss_fn, params) if cfg.cuda_graphs and rt.device.type == "cuda" else None
    log.info(f"{len(train_seqs)} examples | global batch {plan.global_batch} | {plan.steps_per_epoch} steps/epoch "
             f"| {total_steps} steps | {sum(p.numel() for p in params):,} trainable parameters")

    def save() -> None:
        if rt.is_main:
            save_checkpoint(out, model=model, opt=opt, state={**state, "rng": rng_state()}, config=record,
                            keep_last=cfg.keep_last)

    model.train()
    # Timed: the training steps this process ran, not evaluations or checkpoints (an hour-long run spends minutes
    # in each), and not the steps a resumed run inherited. The rate is over the window since the last record.
    pace = _Pace()
    with _StopRequest() as stop:
        while state["step"] < total_steps:
            step = state["step"]
            _reseed(cfg.seed, step, rt.rank)
            lr = lr_at(step, cfg.optim, total_steps)
            set_lr(opt, lr)
            global_seqs = [train_seqs[i] for i in plan.global_indices(step)]  # every rank counts the same batch
            micro_batches = [[train_seqs[i] for i in idx] for idx in plan.micro_batches(step, rt.rank)]
            t_step = time.perf_counter()
            try:
                result = train_step(loss_fn, opt, params, micro_batches, layout=cfg.layout, pad_id=pad_id,
                                    weight_sum=sum(s.supervised_weight for s in global_seqs), grad_clip=cfg.grad_clip,
                                    device=rt.device, world_size=rt.world_size, stop=lambda: stop.signal is not None,
                                    graphs=graphs)
            except NonFiniteError as e:
                raise NonFiniteError(f"{e} at step {step + 1}; stopped without saving, the last good checkpoint in "
                                     f"{out / 'checkpoints'} is intact") from None
            pace.add(time.perf_counter() - t_step, sum(len(s.ids) for s in global_seqs))
            state["step"] += 1
            if state["step"] % cfg.log_every == 0 or state["step"] == total_steps:
                log.step(step=state["step"], total=total_steps, loss=result.loss, lr=lr, gnorm=result.grad_norm,
                         tokens_per_s=pace.window_rate(), eta=pace.mean_step_s() * (total_steps - state["step"]),
                         peak_mem_gb=peak_memory_gb(rt.device),
                         supervised_tokens=sum(s.n_supervised for s in global_seqs), tokens=pace.tokens,
                         train_s=pace.seconds)
            done = state["step"] == total_steps
            if evaluator is not None and (done or (cfg.eval_every and state["step"] % cfg.eval_every == 0)):
                _evaluate(evaluator, model, state, out, rt, log, record)
            # one process: a signal seen by the end of the step (evaluation included); several: the decision every
            # rank took together in train_step
            stopping = result.stop if rt.distributed else stop.signal is not None
            if done or state["step"] % cfg.save_every == 0 or stopping:
                save()
            if stopping:
                log.info(f"stop signal received ({'here: ' + str(stop.signal) if stop.signal else 'by another rank'})"
                         f": checkpoint saved at step {state['step']}; continue with --resume")
                state["interrupted"] = True
                break
    if rt.distributed:
        dist.barrier()
    return state


def _checkpoint_to_resume(out: Path, rt: Runtime, log: MetricsLog):
    """The newest checkpoint that reads back completely (rank 0 chooses, falling back past damaged ones with a
    warning; the other ranks read the one it chose), or None to start from step 0."""
    name = error = None
    if rt.is_main:
        remove_stale_temporaries(out)
        try:
            ckpt = latest_valid_checkpoint(out, warn=log.info)
            name = None if ckpt is None else ckpt.path.name
        except CheckpointError as e:
            error = str(e)
    if rt.distributed:
        holder = [name, error]
        dist.broadcast_object_list(holder, src=0)
        name, error = holder
    if error is not None:
        raise CheckpointError(error)
    if name is None:
        return None
    if rt.is_main:
        return ckpt
    path = out / "checkpoints" / name
    try:
        return read_checkpoint(path)
    except CheckpointError as e:
        raise CheckpointError(f"rank {rt.rank} cannot read the checkpoint rank 0 resumes from: {e}") from None


def _evaluate(evaluator: Evaluator, model: nn.Module, state: dict, out: Path, rt: Runtime, log: MetricsLog,
              record: dict) -> None:
    """Dev evaluation on the main process; keeps the best adapters by weighted F1 in <out_dir>/best/."""
    if rt.is_main:
        model.eval()
        metrics = evaluator(model)
        model.train()
        f1 = float(metrics["weighted_f1"])
        log.info(f"eval @ step {state['step']}: " + " | ".join(
            f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
        log.write({"step": state["step"], "eval": {k: v for k, v in metrics.items() if isinstance(v, float)}})
        if f1 > state["best_weighted_f1"]:
            save_best(out, adapters=trainable_state(model), config={**record, "step": state["step"],
                                                                     "metrics": metrics}, step=state["step"])
            state["best_weighted_f1"], state["best_step"] = f1, state["step"]
    if rt.distributed:
        # every rank needs the same best-metric state so their checkpoints agree
        holder = [state["best_weighted_f1"], state["best_step"]]
        dist.broadcast_object_list(holder, src=0)
        state["best_weighted_f1"], state["best_step"] = holder
