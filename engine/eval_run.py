"""`run_eval(cfg)`: base model (+ the run's adapters) -> label-restricted predictions on a split -> report files."""
from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from model.lora import apply_lora

from .build import build_base_model, load_codec, lora_config
from .calibration import CALIBRATION_FILE, Calibration, fit_calibration, read_calibrations, write_calibration
from .checkpoint import find_adapters, load_trainable
from .config import EvalConfig, TrainConfig
from .data import load_example_set, parse_spec, prompt_config
from .evaluate import predict_set, subset, write_eval_outputs
from .metrics import classification_report
from .runtime import setup_runtime, teardown_runtime


def _dev_calibration(model, tok, spec: str, labels: tuple[str, ...], pcfg, knowledge: tuple[str, ...],
                     adapters_dir: Path, *, max_len: int, batch_size: int) -> Calibration:
    """The run's offsets for spec's dataset (whose labels are `labels`): read from calibration.json beside the
    adapters, else fit now on the whole dev split (never another split) and stored there for the next
    evaluation. The dev split is only loaded when a fit is needed."""
    kind = parse_spec(spec)[0]
    stored = read_calibrations(adapters_dir).get(kind)
    if stored is not None:
        if stored.labels != labels:
            raise ValueError(f"{adapters_dir / CALIBRATION_FILE}: {kind} offsets are for labels "
                             f"{stored.labels}, the data has {labels}")
        print(f"calibration: {kind} offsets from {adapters_dir / CALIBRATION_FILE}", flush=True)
        return stored
    dev = load_example_set(spec, "dev", pcfg, knowledge)
    print(f"calibration: fitting {kind} label offsets on the dev split ({len(dev.examples)} utterances)", flush=True)
    _, probs = predict_set(model, tok, dev, max_len=max_len, batch_size=batch_size, progress=True)
    gold = np.array([dev.labels.index(ex.label) for ex in dev.examples])
    cal = fit_calibration(torch.log(probs).numpy(), gold, dev.labels, dev.dataset)
    file = write_calibration(adapters_dir, cal)
    print(f"calibration: dev weighted F1 {100 * cal.dev_before['weighted_f1']:.2f} -> "
          f"{100 * cal.dev_after['weighted_f1']:.2f} (in-sample), offsets {dict(zip(cal.labels, cal.offsets))}; "
          f"wrote {file}", flush=True)
    return cal


def subset_gold_report(eset, preds: list[str], max_examples: int) -> dict:
    """classification_report of `preds` against the gold labels of the evaluated (sub)set."""
    gold = [ex.label for ex in subset(eset.examples, max_examples)]
    return classification_report(gold, preds, list(eset.labels))


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
        # a run trained with retrieved demonstrations is evaluated with them unless --retrieval says otherwise
        pcfg = prompt_config(train_cfg.context_turns, cfg.n_shots, cfg.shot_seed,
                             retrieval=cfg.retrieval or train_cfg.retrieval)
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
            extra = {}
            if cfg.calibration == "dev":
                # the offsets come from the dev split only; on dev itself the report is in-sample (said in it)
                cal = _dev_calibration(model, tok, spec, eset.labels, pcfg, knowledge, adapters.parent,
                                       max_len=train_cfg.max_len, batch_size=cfg.batch_size)
                raw = subset_gold_report(eset, preds, cfg.max_examples)
                preds = [eset.labels[i] for i in cal.predict(torch.log(probs).numpy())]
                extra = {"calibration": {**asdict(cal), "in_sample": cfg.split == "dev"},
                         "uncalibrated": {k: raw[k] for k in ("accuracy", "weighted_f1", "macro_f1")}}
            rep = write_eval_outputs(out, eset, preds, probs, title=f"{kind} {cfg.split}" + (
                                     " (dev-calibrated label priors)" if extra else ""),
                                     max_examples=cfg.max_examples, extra=extra)
            print((out / "report.txt").read_text(), flush=True)
            print(f"wrote {out}/predictions.csv, report.json, report.txt, confusion.png", flush=True)
            reports.append(rep)
        return reports
    finally:
        teardown_runtime()
