"""`train(cfg)`: everything a run does, in order. Data and tokenizer are validated before the model loads,
so a bad path or an over-long example fails in seconds, not after loading 13 GB of weights."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from .build import build_lora_model, load_codec
from .checkpoint import init_adapters_file, load_trainable
from .config import TrainConfig
from .data import load_example_set, prompt_config, training_data
from .evaluate import evaluate_sets
from .loop import train_loop
from .runtime import seed_everything, setup_runtime, teardown_runtime


def train(cfg: TrainConfig) -> dict:
    rt = setup_runtime(cfg.device, cfg.dtype, cfg.kernels)
    try:
        if cfg.packed_attention == "flex" and rt.device.type != "cuda":
            raise ValueError(f"--packed_attention flex trains on CUDA only (flex_attention has no {rt.device.type} "
                             "backward in torch 2.13); use --packed_attention sdpa")
        seed_everything(cfg.seed)
        init_file = init_adapters_file(cfg.init_adapters, asdict(cfg)) if cfg.init_adapters else None
        tok = load_codec(cfg.model, cfg.tokenizer, cfg.prompt_format)
        train_seqs, fingerprints = training_data(cfg.train_data, tok, max_len=cfg.max_len,
                                                 context_turns=cfg.context_turns, knowledge=cfg.knowledge,
                                                 seed=cfg.seed, task=cfg.task, retrieval=cfg.retrieval,
                                                 aux_impact=cfg.aux_impact)
        dev_sets = [load_example_set(s, "dev", prompt_config(cfg.context_turns, retrieval=cfg.retrieval),
                                     cfg.knowledge)
                    for s in cfg.dev_data]
        if rt.is_main:
            out = Path(cfg.out_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2, sort_keys=True))
            print(f"config: {json.dumps(asdict(cfg), sort_keys=True)}", flush=True)
        model, mcfg = build_lora_model(cfg, rt, vocab_size=tok.vocab_size)
        if init_file is not None:
            # A new stage: only the adapter weights carry over; optimizer, step and lr schedule start fresh. On
            # --resume, train_loop then copies the checkpoint's adapters over all of these, so the checkpoint wins.
            load_trainable(model, init_file)
            if rt.is_main:
                print(f"init adapters: {init_file}", flush=True)

        def evaluator(m):
            return evaluate_sets(m, tok, dev_sets, max_len=cfg.max_len, batch_size=cfg.micro_batch,
                                 max_examples=cfg.eval_max_examples)

        return train_loop(cfg, rt, model, mcfg, train_seqs, tok.pad_id, evaluator if dev_sets else None,
                          data_fingerprints=fingerprints)
    finally:
        teardown_runtime()
