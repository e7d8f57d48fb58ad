"""`train(cfg)`: everything a run does, in order. Data and tokenizer are validated before the model loads,
so a bad path or an over-long example fails in seconds, not after loading 13 GB of weights.

`main` is train.py's face (`torchrun train.py ...`, the `llama-erc-train` console script)."""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

from safetensors.torch import load_file

from llama_erc.data import dev_sets, training_data
from llama_erc.engine.build import build_lora_model, load_codec
from llama_erc.engine.checkpoint import init_adapters_file, load_trainable
from llama_erc.engine.config import TrainConfig, parse_config
from llama_erc.engine.evaluate import evaluate_sets
from llama_erc.engine.loop import train_loop
from llama_erc.engine.runtime import seed_everything, setup_runtime, teardown_runtime
from llama_erc.engine.step import NonFiniteError
from llama_erc.model.llamacpp_lora import export_llamacpp_lora
from llama_erc.model.lora import lora_state_dict


def train(cfg: TrainConfig) -> dict:
    rt = setup_runtime(cfg.device, cfg.dtype, cfg.kernels)
    try:
        # the run computes in one dtype and records it (a resume elsewhere, where auto chose otherwise, is refused)
        cfg = replace(cfg, dtype=rt.dtype_name)
        if rt.is_main and rt.dtype_reason:
            print(f"dtype: {rt.dtype_reason}", flush=True)
        if cfg.packed_attention == "flex" and rt.device.type != "cuda":
            raise ValueError(f"--packed_attention flex trains on CUDA only (flex_attention has no {rt.device.type} "
                             "backward in torch 2.13); use --packed_attention sdpa")
        if cfg.cuda_graphs and rt.world_size > 1:
            raise ValueError(f"--cuda_graphs captures one process's step, got {rt.world_size} processes "
                             "(DistributedDataParallel's gradient hooks are not captured); run one process")
        if cfg.cuda_graphs and rt.device.type != "cuda" and rt.is_main:
            print(f"--cuda_graphs on {rt.device.type}: the fixed-shape batches run eagerly (capture needs CUDA)",
                  flush=True)
        seed_everything(cfg.seed)
        init_file = init_adapters_file(cfg.init_adapters, asdict(cfg)) if cfg.init_adapters else None
        codec = load_codec(cfg.model, cfg.tokenizer, cfg.prompt_format)
        guard = cfg.data.leak_guard()  # before any example is built: dropped dialogues reach no batch, no pool
        if rt.is_main:
            for line in guard.report.lines():
                print(line, flush=True)
        train_seqs, fingerprints = training_data(cfg.data, codec, cfg.seed, guard)
        dev = dev_sets(cfg.data, guard)
        model, mcfg = build_lora_model(cfg.model, rt, cfg.lora, vocab_size=codec.vocab_size, seed=cfg.seed,
                                       activation_checkpointing=cfg.activation_checkpointing,
                                       fused_lora=cfg.fused_lora, base_quant=cfg.base_quant,
                                       tokens=cfg.micro_batch * cfg.max_len)  # a micro-batch's rows at most
        # auto's choice is the run's: recorded in config.json and in every checkpoint's run record
        cfg = replace(cfg, activation_checkpointing=model.activation_checkpointing)
        if rt.is_main:
            out = Path(cfg.out_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2, sort_keys=True))
            print(f"config: {json.dumps(asdict(cfg), sort_keys=True)}", flush=True)
        if init_file is not None:
            # A new stage: only the adapter weights carry over; optimizer, step and lr schedule start fresh. On
            # --resume, train_loop then copies the checkpoint's adapters over all of these, so the checkpoint wins.
            load_trainable(model, init_file)
            if rt.is_main:
                print(f"init adapters: {init_file}", flush=True)

        def evaluator(m):
            return evaluate_sets(m, codec, dev, max_len=cfg.max_len, batch_size=cfg.dev_batch_size,
                                 max_examples=cfg.eval_max_examples, cuda_graphs=cfg.cuda_graphs)

        state = train_loop(cfg, rt, model, mcfg, train_seqs, codec.pad_id, evaluator if dev else None,
                           data_fingerprints=fingerprints, leak=guard.report.to_json())
        if rt.is_main and cfg.base_quant == "gguf" and not state.get("interrupted"):
            write_llamacpp_adapter(cfg, model)
        return state
    finally:
        teardown_runtime()


def write_llamacpp_adapter(cfg: TrainConfig, model) -> Path:
    """A run on a GGUF file's own blocks also hands llama.cpp its adapters for that file (model/llamacpp_lora.py):
    <out_dir>/llamacpp-adapter.gguf, from best/ when the run kept one, else the final adapters."""
    out = Path(cfg.out_dir)
    best = out / "best" / "adapters.safetensors"
    tensors = load_file(str(best)) if best.is_file() else lora_state_dict(model)
    path = export_llamacpp_lora(tensors, cfg.lora, out / "llamacpp-adapter.gguf", base_name=Path(cfg.model).stem)
    print(f"llama.cpp adapter ({'best' if best.is_file() else 'final'} adapters) for {cfg.model}: {path} "
          f"(llama-cli -m {cfg.model} --lora {path})", flush=True)
    return path


def main(argv: list[str] | None = None) -> int:
    """train.py: exit 0 when done (or stopped by a signal, resumable), 1 on a non-finite loss, 2 on bad input."""
    try:
        cfg = parse_config(TrainConfig, argv)
        state = train(cfg)
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as e:  # bad arguments, data or checkpoints: DataError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done at step {state['step']}" + (" (interrupted; resume with --resume)" if state.get("interrupted")
                                             else "") + f"; outputs in {cfg.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
