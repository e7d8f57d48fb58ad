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

from llama_erc.data import LeakGuard, load_example_set, parse_spec
from llama_erc.engine.build import build_lora_model, load_codec
from llama_erc.engine.calibration import (CALIBRATION_FILE, Calibration, PriorShift, fit_calibration,
                                          fit_prior_shift, read_calibrations, write_calibration)
from llama_erc.engine.checkpoint import (check_same_base, find_adapters, load_trainable, read_run_record,
                                         train_config_of)
from llama_erc.engine.config import EvalConfig, TrainConfig, parse_config, resolve_run_config
from llama_erc.engine.evaluate import predict_set, subset, write_eval_outputs
from llama_erc.engine.metrics import classification_report
from llama_erc.engine.runtime import setup_runtime, teardown_runtime


def _dev_calibration(model, codec, spec: str, labels: tuple[str, ...], pcfg, knowledge: tuple[str, ...],
                     guard: LeakGuard, adapters_dir: Path, method: str, *, max_len: int,
                     batch_size: int, cuda_graphs: bool = False) -> Calibration | PriorShift:
    """The run's calibration of spec's dataset (whose labels are `labels`) by `method` (prior-shift or
    dev-insample): read from calibration.json beside the adapters, else fit now on the whole dev split (never
    another split) and stored there for the next evaluation. The dev split is only loaded when a fit is needed."""
    kind = parse_spec(spec)[0]
    stored = read_calibrations(adapters_dir).get(kind)
    if stored is not None and stored.method == method:
        if stored.labels != labels:
            raise ValueError(f"{adapters_dir / CALIBRATION_FILE}: {kind} offsets are for labels "
                             f"{stored.labels}, the data has {labels}")
        print(f"calibration: {kind} offsets from {adapters_dir / CALIBRATION_FILE} ({method})", flush=True)
        return stored
    dev = load_example_set(spec, "dev", pcfg, knowledge, guard)
    print(f"calibration: fitting {kind} label offsets on the dev split ({len(dev.examples)} utterances, {method})",
          flush=True)
    _, probs = predict_set(model, codec, dev, max_len=max_len, batch_size=batch_size, progress=True,
                           cuda_graphs=cuda_graphs)
    log_probs = torch.log(probs).numpy()
    gold = np.array([dev.labels.index(ex.label) for ex in dev.examples])
    if method == "prior-shift":
        train_labels = [u.emotion for d in guard.train_dialogues(spec) for u in d.utterances]
        counts = np.array([train_labels.count(label) for label in dev.labels])
        cal = fit_prior_shift(log_probs, gold, [ex.dialogue_id for ex in dev.examples], counts, dev.labels,
                              dev.dataset, data=f"the dev split of {spec} ({len(dev.examples)} utterances)")
    else:
        cal = fit_calibration(log_probs, gold, dev.labels, dev.dataset)
    file = write_calibration(adapters_dir, cal)
    print(f"calibration: {cal.summary()}; wrote {file}", flush=True)
    return cal


def subset_gold_report(eset, preds: list[str], max_examples: int) -> dict:
    """classification_report of `preds` against the gold labels of the evaluated (sub)set."""
    gold = [ex.label for ex in subset(eset.examples, max_examples)]
    return classification_report(gold, preds, list(eset.labels))


def _leak_check(cfg: EvalConfig, run: TrainConfig | None, record: dict) -> tuple[LeakGuard, dict[str, dict]]:
    """The leak guard of this evaluation (its retrieval pools leave out what it drops), and for each scored spec
    what the run's training dialogues, less those its own guard dropped, share with it from another corpus
    (data/leaks.py). A share refuses the evaluation unless --allow_overlap, which every report then states."""
    train_specs = list(run.train_data) if run else []
    unchecked = [s for s in train_specs if not Path(parse_spec(s)[1]).exists()]
    for spec in unchecked:
        print(f"leak guard: cannot check the run's training data {spec} (not found here)", flush=True)
    train_specs = [s for s in train_specs if s not in unchecked]
    guard = LeakGuard([*train_specs, *cfg.data], allow=cfg.allow_overlap)
    dropped = (record.get("leak") or {}).get("dropped", {})
    leaks = {}
    for spec in cfg.data:
        found = guard.trained_overlap(train_specs, dropped, spec, cfg.split)
        found.update(allowed=cfg.allow_overlap, run_allowed_overlap=bool(run and run.allow_overlap),
                     unchecked=unchecked)
        if found["utterances"]:
            what = (f"the run's training data shares {found['utterances']} utterances ({found['dialogues']} train "
                    f"dialogues: " + ", ".join(f"{s}: {v['dialogues']}" for s, v in found["by_train_spec"].items())
                    + f") with {found['scored']}")
            if not cfg.allow_overlap:
                raise ValueError(f"--run {cfg.run}: {what}; its scores there would not be clean. Score another "
                                 "split, retrain with the leak guard on, or pass --allow_overlap (the report says so)")
            print(f"leak guard: --allow_overlap: {what}", flush=True)
        leaks[spec] = found
    return guard, leaks


def run_eval(cfg: EvalConfig) -> list[dict]:
    run, adapters, run_dtype, record = None, None, None, {}
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
        guard, leaks = _leak_check(cfg, run, record)
        sets = [load_example_set(s, cfg.split, pcfg, rc.knowledge, guard) for s in cfg.data]
        if run is not None:
            # before loading: a run's adapters need the quantized base they trained on
            check_same_base(record, run.model, rc.model, rc.base_quant, config_file)
        model, _ = build_lora_model(rc.model, rt, rc.lora if adapters is not None else None,
                                    vocab_size=codec.vocab_size, seed=rc.seed, base_quant=rc.base_quant)
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
                                       max_examples=cfg.max_examples, progress=True, cuda_graphs=cfg.cuda_graphs)
            extra = {"leak": leaks[spec]}
            if cfg.calibration != "none":
                # the offsets come from the dev split only; on dev itself the report is in-sample (said in it)
                method = "prior-shift" if cfg.calibration == "dev" else "dev-insample"
                cal = _dev_calibration(model, codec, spec, eset.labels, pcfg, rc.knowledge, guard, adapters.parent,
                                       method, max_len=rc.max_len, batch_size=cfg.batch_size,
                                       cuda_graphs=cfg.cuda_graphs)
                raw = subset_gold_report(eset, preds, cfg.max_examples)
                preds = [eset.labels[i] for i in cal.predict(torch.log(probs).numpy(), cfg.calibration_metric)]
                extra.update(calibration={**asdict(cal), "metric": cfg.calibration_metric,
                                          "applied_offsets": list(cal.offsets_for(cfg.calibration_metric)),
                                          "in_sample": cfg.split == "dev"},
                             uncalibrated={k: raw[k] for k in ("accuracy", "weighted_f1", "macro_f1", "per_class",
                                                               "confusion_matrix")})
            title = f"{kind} {cfg.split}"
            if "calibration" in extra:
                title += f" (dev-calibrated label priors, {cfg.calibration})"
            if leaks[spec]["utterances"]:
                title += " (overlapping train data allowed)"
            rep = write_eval_outputs(out, eset, preds, probs, title=title, max_examples=cfg.max_examples, extra=extra)
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
