"""`run_eval(cfg)`: base model (+ the run's adapters) -> label-restricted predictions on a split -> report files."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from model.lora import apply_lora

from .build import build_base_model, load_codec, lora_config
from .checkpoint import list_checkpoints, load_trainable
from .config import EvalConfig, TrainConfig
from .data import load_example_set, parse_spec, prompt_config
from .evaluate import predict_set, write_eval_outputs
from .runtime import setup_runtime, teardown_runtime


def find_adapters(run: Path) -> tuple[Path, Path]:
    """(adapters.safetensors, config.json) of a run dir (best/ first, else newest checkpoint) or checkpoint dir."""
    for d in [run / "best", run] + list(reversed(list_checkpoints(run))):
        if (d / "adapters.safetensors").is_file() and (d / "config.json").is_file():
            return d / "adapters.safetensors", d / "config.json"
    raise ValueError(f"--run {run}: no adapters.safetensors with a config.json in it, its best/ or checkpoints/")


def run_eval(cfg: EvalConfig) -> list[dict]:
    train_cfg, adapters = TrainConfig(), None
    if cfg.run:
        adapters, config_file = find_adapters(Path(cfg.run))
        saved = json.loads(config_file.read_text())["train"]
        train_cfg = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
    train_cfg = replace(train_cfg, model=cfg.model or train_cfg.model, tokenizer=cfg.tokenizer or train_cfg.tokenizer,
                        context_turns=cfg.context_turns or train_cfg.context_turns,
                        max_len=cfg.max_len or train_cfg.max_len,
                        prompt_format=cfg.prompt_format or train_cfg.prompt_format)
    # dtype and kernels follow the run unless given: an fp32 run is evaluated in fp32
    rt = setup_runtime(cfg.device, cfg.dtype or train_cfg.dtype, cfg.kernels or train_cfg.kernels)
    try:
        tok = load_codec(train_cfg.model, train_cfg.tokenizer, train_cfg.prompt_format)
        pcfg = prompt_config(train_cfg.context_turns, cfg.n_shots, cfg.shot_seed)
        knowledge = cfg.knowledge or train_cfg.knowledge  # checked against --data by EvalConfig, when given
        sets = [load_example_set(s, cfg.split, pcfg, knowledge) for s in cfg.data]
        model, _ = build_base_model(train_cfg.model, rt, vocab_size=tok.vocab_size, seed=train_cfg.seed)
        if adapters is not None:
            apply_lora(model, lora_config(train_cfg), verbose=False)
            load_trainable(model, adapters)
        model.eval()
        reports = []
        for spec, eset in zip(cfg.data, sets):
            kind = parse_spec(spec)[0]
            out = Path(cfg.out_dir) if cfg.out_dir else Path(cfg.run or "runs/zero_shot") / f"eval_{cfg.split}_{kind}"
            if len(cfg.data) > 1 and cfg.out_dir:
                out = out / kind
            print(f"evaluating {kind} {cfg.split}: {min(len(eset.examples), cfg.max_examples or 10**12)} "
                  f"utterances, adapters: {adapters or 'none (base model)'}", flush=True)
            preds, probs = predict_set(model, tok, eset, max_len=train_cfg.max_len, batch_size=cfg.batch_size,
                                       max_examples=cfg.max_examples, progress=True)
            rep = write_eval_outputs(out, eset, preds, probs, title=f"{kind} {cfg.split}",
                                     max_examples=cfg.max_examples)
            print((out / "report.txt").read_text(), flush=True)
            print(f"wrote {out}/predictions.csv, report.json, report.txt, confusion.png", flush=True)
            reports.append(rep)
        return reports
    finally:
        teardown_runtime()
