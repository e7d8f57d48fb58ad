"""`run_eval(cfg)`: base model (+ the run's adapters) -> label-restricted predictions on a split -> report files.

Whatever eval.py does not set comes from the run's record (engine/config.py: resolve_run_config), so a run is
evaluated with the prompts, tokenizer and model it trained with. `main` is eval.py's face (`python eval.py`,
the `llama-erc-eval` console script).
"""
from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from llama_erc.data import load_example_set, parse_spec
from llama_erc.engine.build import build_lora_model, load_codec
from llama_erc.engine.calibration import (CALIBRATION_FILE, Calibration, fit_calibration, read_calibrations,
                                          write_calibration)
from llama_erc.engine.checkpoint import find_adapters, load_trainable, read_run_record, train_config_of
from llama_erc.engine.config import EvalConfig, parse_config, resolve_run_config
from llama_erc.engine.evaluate import predict_set, subset, write_eval_outputs
from llama_erc.engine.metrics import classification_report
from llama_erc.engine.runtime import setup_runtime, teardown_runtime


def _dev_calibration(model, codec, spec: str, labels: tuple[str, ...], pcfg, knowledge: tuple[str, ...],
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
    _, probs = predict_set(model, codec, dev, max_len=max_len, batch_size=batch_size, progress=True)
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
    run, adapters, run_dtype = None, None, None
    if cfg.run:
        adapters, config_file = find_adapters(Path(cfg.run))
        record = read_run_record(config_file)
        run, run_dtype = train_config_of(record, config_file), record["train"].get("dtype")
    rc = resolve_run_config(cfg, run)
    rt = setup_runtime(cfg.device, cfg.dtype, rc.kernels, trained_dtype=run_dtype)
    try:
        if rt.dtype_reason:
            print(f"dtype: {rt.dtype_reason}", flush=True)
        codec = load_codec(rc.model, rc.tokenizer, rc.prompt_format)
        pcfg = rc.prompt_config(cfg.n_shots, cfg.shot_seed)  # the run's prompts (retrieval included), eval's shots
        sets = [load_example_set(s, cfg.split, pcfg, rc.knowledge) for s in cfg.data]
        model, _ = build_lora_model(rc.model, rt, rc.lora if adapters is not None else None,
                                    vocab_size=codec.vocab_size, seed=rc.seed)
        if adapters is not None:
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
            preds, probs = predict_set(model, codec, eset, max_len=rc.max_len, batch_size=cfg.batch_size,
                                       max_examples=cfg.max_examples, progress=True)
            extra = {}
            if cfg.calibration == "dev":
                # the offsets come from the dev split only; on dev itself the report is in-sample (said in it)
                cal = _dev_calibration(model, codec, spec, eset.labels, pcfg, rc.knowledge, adapters.parent,
                                       max_len=rc.max_len, batch_size=cfg.batch_size)
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


def main(argv: list[str] | None = None) -> int:
    """eval.py: exit 0 when the reports are written, 2 on bad input."""
    try:
        run_eval(parse_config(EvalConfig, argv))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
