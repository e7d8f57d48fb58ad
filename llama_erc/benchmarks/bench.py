"""Training and evaluation throughput: this engine vs transformers + PEFT, one after the other, same device.
bench.py at the repository root (and the `llama-erc-bench` console script) runs `main`.

    python bench.py --mode erc   [--packing] [--packed-attention flex] [--fused-lora] [--compile] [--kernels on|off]
    python bench.py --mode erc   --variants base,packing,packing+prefix,packing+flex,packing+fused+selective+compile
    python bench.py --mode erc   --checkpointing off --variants packing+prefix,packing+prefix+graphs
    python bench.py --mode fixed [--seq-len 512]

Systems (each built, run and freed in turn, on identical batches):
    ours          the model training builds (engine.build.build_lora_model: model.Transformer + hand-written
                  LoRA, fp32 adapters cast to bf16 in forward) stepped by the training step itself
                  (engine.step.train_step: the loss projected onto the vocabulary at supervised positions only,
                  clipping, the finite check, AdamW); optional packing (engine/packing.py) with a bool SDPA mask
                  or a flex_attention BlockMask, the fused LoRA autograd (kernels/lora_linear.py), Triton kernels
                  and torch.compile of each block. --variants runs several
                  such configurations one after the other as systems `ours[packing+flex]` etc. (`prefix`: the
                  prompts' common instruction held once per packed row, engine/packing.py; `selective`: selective
                  activation checkpointing, model/llama.py; `block`: block recompute, the GEMM outputs kept and
                  replayed, model/recompute.py; `nf4`, `q8_0`: the frozen base held quantized, model/quant.py,
                  as --base-quant does for every variant; `graphs`: fixed-shape packed batches whose forward +
                  backward are one CUDA graph per shape, engine/graphs.py, captured in an untimed pass over the
                  batches first, with --checkpointing off as long as activation checkpointing is not known to
                  capture); the headline ratios use the fastest of them (named in the report as `headline`).
    hf_peft_bf16  transformers LlamaForCausalLM (SDPA) + PEFT LoRA, adapters kept in bf16
                  (get_peft_model(..., autocast_adapter_dtype=False)); the baseline the ratios use.
    hf_peft_fp32  the same with PEFT's default fp32 adapters.
Both sides: bf16 base weights, non-reentrant activation checkpointing per block, LoRA r=8 on q/v (or all seven
linears), the same dropout, AdamW (fused on CUDA) over the adapters, grad-norm clip 1.0, one micro-batch per step.
HF gets right-padded rows with an attention_mask and labels, as a transformers data collator produces them.

Model: the LLaMA-2-7B architecture with random N(0, 0.02) weights, built on the meta device and materialised on
the GPU (or --model DIR, an HF-layout checkpoint both sides load). On CPU: the `tiny` preset (or --model DIR), a
harness check only, never a performance number; the report names the model, its size, the device and the dtype
(--dtype auto: bf16 on a GPU, and on a CPU with native bf16 matmul; engine/runtime.py).
Batches: --mode erc takes real ERC training examples (DialogueLLM prompts from MELD via data.training_data), so
the padding waste is what users see; --mode fixed takes random rows of --seq-len tokens, every token supervised.

tokens/s counts the examples' tokens (pads never), whatever a system does to compute them: a shared prefix is
computed once per row but counted for every example, as the same training data is processed. MFU, in contrast,
counts only the block matmuls actually run (`computed_token_fraction` in the report), so no variant inflates it.
Timing: CUDA-synchronised wall clock per step; the first --warmup steps are excluded and rates are medians over
the --steps measured steps. Memory: torch.cuda.max_memory_allocated / max_memory_reserved from just after the
model is built (weights included) to the end of its steps; `overhead_ratio` compares the peaks above each
system's resident model, i.e. what training adds (the 13.5 GB of frozen bf16 7B weights are the same for both
and bound `memory_ratio` from below at about 13.5 / (13.5 + HF's overhead)).
Model FLOPs per example of L tokens with n_sup supervised (frozen weights: forward 2 x params, backward only the
input gradients, another 2 x params; adapters and norms are ignored, recomputation under checkpointing is not
counted, as usual for MFU):
    4 * P_blocks * L  +  4 * dim * vocab * n_sup  +  n_layers * 6 * dim * L * (L + 1)
the last term being causal attention (QK^T and PV forward, 2 FLOPs per multiply-add over the L(L+1)/2 visible
pairs, times 3 for forward + backward). MFU divides by the bf16 matmul rate measured here (8192^3 GEMMs).
Evaluation: utterances/s of label-restricted decoding (engine.decode.predict_labels) vs HF generate with beam
search (4 beams, max_new_tokens = the longest label + EOS unless --max-new-tokens) followed by string matching,
on the first --eval-examples dev examples, one warm-up batch untimed.
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from llama_erc.benchmarks.hf_baseline import build_hf, hf_step, sync, time_hf_eval
from llama_erc.benchmarks.matmul import matmul_tflops
from llama_erc.benchmarks.provenance import ROOT
from llama_erc.benchmarks.report import BASELINE, build_report, markdown
from llama_erc.data import (DataConfig, PromptCodec, Sequence, build_codec, encode_prompt, encode_response,
                            find_tokenizer, load_example_set, load_tokenizer, training_data)
from llama_erc.demo import DEMO_DATA
from llama_erc.engine.build import build_lora_model
from llama_erc.engine.decode import predict_labels
from llama_erc.engine.graphs import ScoreGraphs, StepGraphs
from llama_erc.engine.loss import SupervisedLoss
from llama_erc.engine.optim import OptimConfig, make_optimizer, trainable_parameters
from llama_erc.engine.packing import BatchLayout
from llama_erc.engine.runtime import DTYPE_CHOICES, setup_runtime
from llama_erc.engine.step import train_step
from llama_erc.model.config import ModelConfig, from_hf_config, preset
from llama_erc.model.lora import VALID_TARGETS, LoRAConfig

SHARED = ROOT.parent / "shared"


@dataclass(frozen=True)
class Variant:
    """One configuration of our engine: "base" or a '+'-joined subset of VARIANT_TOKENS."""
    packing: bool = False
    flex: bool = False  # packed rows through flex_attention BlockMasks instead of a bool SDPA mask
    share_prefix: bool = False  # packed rows hold the examples' common prompt prefix once
    fused_lora: bool = False
    compile: bool = False
    selective: bool = False  # selective activation checkpointing (with --checkpointing on; HF stays full)
    block: bool = False  # block recompute (model/recompute.py; with --checkpointing on; HF stays full)
    nf4: bool = False  # the frozen base held as NF4 (model/quant.py), whatever --base-quant says
    q8_0: bool = False  # ... as GGUF Q8_0
    cuda_graphs: bool = False  # fixed-shape packed batches, each shape's forward + backward a CUDA graph

    def __post_init__(self) -> None:
        if (self.flex or self.share_prefix or self.cuda_graphs) and not self.packing:
            raise ValueError(f"variant {self.spec!r}: flex, prefix and graphs apply to packed rows, add packing")
        if self.cuda_graphs and (self.flex or self.compile):
            raise ValueError(f"variant {self.spec!r}: graphs take the bool SDPA mask and eager blocks (not flex, "
                             "not compile)")
        if self.nf4 and self.q8_0:
            raise ValueError(f"variant {self.spec!r}: one base quantization at a time")
        if self.block and (self.selective or self.compile):
            # block swaps its linears' forward for each pass, which a compiled block would recompile every call
            raise ValueError(f"variant {self.spec!r}: block is one checkpointing policy, not combined with "
                             "selective or compile")

    def base_quant(self, default: str) -> str:
        return "nf4" if self.nf4 else "q8_0" if self.q8_0 else default

    @classmethod
    def parse(cls, spec: str) -> "Variant":
        tokens = [] if spec == "base" else spec.split("+")
        if not tokens and spec != "base" or set(tokens) - set(VARIANT_TOKENS) or len(set(tokens)) != len(tokens):
            raise ValueError(f"--variants: {spec!r} must be 'base' or a '+'-joined subset of "
                             f"{', '.join(VARIANT_TOKENS)}")
        return cls(**{VARIANT_TOKENS[t]: True for t in tokens})

    @property
    def spec(self) -> str:
        return "+".join(t for t, field in VARIANT_TOKENS.items() if getattr(self, field)) or "base"


VARIANT_TOKENS = {"packing": "packing", "flex": "flex", "prefix": "share_prefix", "fused": "fused_lora",
                  "compile": "compile", "selective": "selective", "block": "block", "nf4": "nf4",
                  "q8_0": "q8_0", "graphs": "cuda_graphs"}  # --variants token -> Variant field


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("erc", "fixed"), default="erc")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--model", default="", help="preset or HF-layout checkpoint dir (default: llama-2-7b on CUDA, "
                   "tiny on CPU)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="auto: bf16 on CUDA and on a CPU with native bf16 matmul, else fp32 (engine/runtime.py)")
    p.add_argument("--meld", default=str(SHARED / "data" / "meld") if (SHARED / "data" / "meld").is_dir()
                   else str(DEMO_DATA))
    p.add_argument("--tokenizer", default="", help="default: the checkpoint's own (--model DIR), else LLaMA 2's")
    p.add_argument("--context-turns", default="2")
    p.add_argument("--max-len", type=int, default=512, help="ERC truncation length and packed row capacity")
    p.add_argument("--seq-len", type=int, default=512, help="row length in --mode fixed")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="measured steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--lora-targets", choices=("qv", "all"), default="qv")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--checkpointing", choices=("on", "off"), default="on", help="activation checkpointing, both")
    p.add_argument("--packing", action="store_true", help="ours: pack each micro-batch into rows of <= max-len")
    p.add_argument("--packed-attention", choices=("sdpa", "flex"), default="sdpa",
                   help="ours, packed rows: bool-mask SDPA or flex_attention BlockMasks")
    p.add_argument("--share-prefix", action="store_true", help="ours, packed rows: the common prompt prefix once a row")
    p.add_argument("--fused-lora", action="store_true", help="ours: the fused LoRA autograd (kernels/lora_linear.py)")
    p.add_argument("--kernels", choices=("auto", "on", "off"), default="auto", help="ours: Triton kernels")
    p.add_argument("--base-quant", choices=("none", "gguf", "nf4", "q8_0"), default="none",
                   help="ours: the frozen base held quantized (model/quant.py); gguf needs a .gguf --model")
    p.add_argument("--compile", action="store_true", help="ours: torch.compile each transformer block")
    p.add_argument("--variants", default="", help="ours: several configurations, e.g. base,packing+flex "
                   "(replaces --packing/--packed-attention/--share-prefix/--fused-lora/--compile)")
    p.add_argument("--systems", default=f"ours,{BASELINE},hf_peft_fp32", help="comma-separated subset to run")
    p.add_argument("--eval-examples", type=int, default=64, help="dev utterances for eval throughput (erc; 0: skip)")
    p.add_argument("--eval-batch", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=0,
                   help="HF generate's limit (0: the longest label + EOS, the least work generation can do)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path("benchmarks") / "results"))
    args = p.parse_args(argv)
    args.device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    args.model = args.model or ("llama-2-7b" if args.device == "cuda" else "tiny")
    if args.device == "cpu" and args.model.startswith("llama-2"):
        p.error(f"--model {args.model} on CPU: the full-size architectures run on a GPU only; use --model tiny")
    args.systems = tuple(s for s in args.systems.split(",") if s)
    unknown = set(args.systems) - {"ours", BASELINE, "hf_peft_fp32"}
    if unknown or not args.systems:
        p.error(f"--systems: unknown {sorted(unknown)}")
    try:
        args.variants = ([Variant.parse(v) for v in args.variants.split(",") if v] if args.variants else
                         [Variant(packing=args.packing, flex=args.packed_attention == "flex",
                                  share_prefix=args.share_prefix, fused_lora=args.fused_lora, compile=args.compile)])
    except ValueError as e:
        p.error(str(e))
    if args.checkpointing == "off" and any(v.selective or v.block for v in args.variants):
        p.error("--variants: selective and block checkpointing need --checkpointing on")
    return args


# ---------------------------------------------------------------- device, batches, FLOPs

def erc_codec(args) -> PromptCodec:
    """--tokenizer, else the checkpoint's own (data.find_tokenizer), else LLaMA 2's for a preset;
    DialogueLLM's alpaca prompts. Records the file used in args.tokenizer (the report's config)."""
    if not args.tokenizer:
        args.tokenizer = str(find_tokenizer(args.model) if Path(args.model).is_dir()
                             else SHARED / "tokenizer" / "llama2" / "tokenizer.model")
    return build_codec(load_tokenizer(args.tokenizer), "alpaca")


def erc_data(args) -> DataConfig:
    """The ERC data the batches are cut from: MELD, DialogueLLM prompts, as train.py would read them."""
    return DataConfig(train_data=(f"meld={args.meld}",), context_turns=args.context_turns, max_len=args.max_len)


def erc_sequences(args, codec: PromptCodec) -> list[Sequence]:
    seqs, _ = training_data(erc_data(args), codec, args.seed)
    random.Random(args.seed).shuffle(seqs)
    return seqs


def fixed_sequences(n: int, length: int, vocab: int, seed: int) -> list[Sequence]:
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(3, vocab, (n, length), generator=g).tolist()
    return [Sequence(tuple(r), tuple(r)) for r in rows]  # every token supervised, like plain LM fine-tuning


def block_params(mcfg) -> int:
    kv = mcfg.n_kv_heads * mcfg.head_dim
    return mcfg.n_layers * (mcfg.dim * (2 * mcfg.dim + 2 * kv) + 3 * mcfg.dim * mcfg.hidden_dim)


def model_flops(seqs: list[Sequence], mcfg, computed_tokens: int | None = None) -> float:
    """Model FLOPs of one training step on `seqs` (module docstring). computed_tokens: the tokens the model was
    actually fed, when fewer than the examples' (a shared prefix is computed once per row): the block matmuls
    are counted for those only, so that MFU is never inflated by work that was not done."""
    p_blocks = block_params(mcfg)
    total = 0.0
    if computed_tokens is not None:
        total -= 4 * p_blocks * (sum(len(s.ids) for s in seqs) - computed_tokens)
    for s in seqs:
        L = len(s.ids)
        total += 4 * p_blocks * L + 4 * mcfg.dim * mcfg.vocab_size * s.n_supervised
        total += mcfg.n_layers * 6 * mcfg.n_heads * mcfg.head_dim * L * (L + 1)
    return total


# ---------------------------------------------------------------- the systems

def lora_targets(args) -> tuple[str, ...]:
    return ("wq", "wv") if args.lora_targets == "qv" else VALID_TARGETS


def build_ours(args, variant: Variant, rt, vocab_size: int | None):
    """The model train.py builds (engine.build.build_lora_model), with the variant's options."""
    checkpointing = ("none" if args.checkpointing == "off" else "selective" if variant.selective else
                     "block" if variant.block else "full")
    net, mcfg = build_lora_model(args.model, rt, LoRAConfig(args.lora_rank, args.lora_alpha, args.lora_dropout,
                                                            lora_targets(args)),
                                 vocab_size=vocab_size, seed=args.seed, activation_checkpointing=checkpointing,
                                 fused_lora=variant.fused_lora, base_quant=variant.base_quant(args.base_quant))
    if variant.compile:
        for layer in net.layers:
            layer.compile()  # in place: parameter names and checkpointing stay as they are
    return net, mcfg


def ours_step(net, args, variant: Variant, rt, pad_id: int):
    """The training step itself (engine.step.train_step), one micro-batch per step; -> (loss, tokens computed)."""
    loss_fn = SupervisedLoss(net)
    params = trainable_parameters(net)
    opt = make_optimizer(params, OptimConfig(lr=args.lr))
    layout = BatchLayout(packing=variant.packing, max_len=args.max_len, flex=variant.flex,
                         share_prefix=variant.share_prefix, fixed_shapes=variant.cuda_graphs)
    # graphs: captured on CUDA (engine/graphs.py); on a CPU the fixed-shape batches run eagerly
    graphs = StepGraphs(loss_fn, params) if variant.cuda_graphs and rt.device.type == "cuda" else None

    def step(seqs: list[Sequence]) -> tuple[float, int]:
        result = train_step(loss_fn, opt, params, [seqs], layout=layout, pad_id=pad_id,
                            weight_sum=sum(s.supervised_weight for s in seqs), grad_clip=1.0, device=rt.device,
                            graphs=graphs)
        return result.loss, result.computed_tokens
    return step


# ---------------------------------------------------------------- measurement

def time_training(step, batches: list[list[Sequence]], warmup: int, mcfg, device, peak_tflops: float) -> dict:
    """Run every batch through `step`; per-step rates over the measured (post-warm-up) steps."""
    times, losses, computed = [], [], []
    for seqs in batches:
        sync(device)
        t0 = time.perf_counter()
        loss, n_computed = step(seqs)
        sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(loss)
        computed.append(n_computed)
    measured = list(zip(times[warmup:], batches[warmup:], computed[warmup:]))
    tok = [sum(len(s.ids) for s in b) / t for t, b, _ in measured]
    sup = [sum(s.n_supervised for s in b) / t for t, b, _ in measured]
    mfu = [model_flops(b, mcfg, c) / t / (peak_tflops * 1e12) for t, b, c in measured]
    measured = [(t, b) for t, b, _ in measured]
    out = {"computed_token_fraction": sum(computed) / sum(len(s.ids) for b in batches for s in b),
           "step_s": statistics.median(t for t, _ in measured), "tokens_per_s": statistics.median(tok),
           "supervised_tokens_per_s": statistics.median(sup), "mfu": statistics.median(mfu),
           "tokens_per_s_aggregate": sum(sum(len(s.ids) for s in b) for _, b in measured) / sum(t for t, _ in measured),
           "step_s_all": times, "loss_first": float(losses[0]), "loss_last": float(losses[-1])}
    if device.type == "cuda":
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["peak_reserved_gb"] = torch.cuda.max_memory_reserved(device) / 2**30
    else:  # no per-system peak on CPU (ru_maxrss only grows): left empty rather than misleading
        out["peak_memory_gb"] = out["peak_reserved_gb"] = None
    return out


def _memory_start(device) -> float | None:
    """Free what the previous system left, start the peak counters; returns GB resident now (the weights)."""
    if device.type != "cuda":
        return None
    gc.collect()  # the previous system's model and optimizer, held in reference cycles
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device) / 2**30


def eval_data(args, codec: PromptCodec):
    eset = load_example_set(f"meld={args.meld}", "dev", erc_data(args).prompt_config())
    examples = eset.examples[:args.eval_examples]
    words = examples[0].choices
    candidates = [encode_response(codec, w) for w in words]
    reserve = max(len(c) for c in candidates)
    prompts = [encode_prompt(codec, ex, args.max_len, n_reserved=reserve) for ex in examples]
    return prompts, candidates, words, list(eset.labels)


@torch.no_grad()
def time_ours_eval(net, prompts, candidates, labels, args, pad_id: int, device, cuda_graphs: bool = False) -> float:
    """utterances/s of label-restricted decoding. cuda_graphs: fixed-shape batches, each shape captured in an
    untimed pass over every prompt first (as the training graphs), then replayed in the timed one."""
    net.eval()
    graphs = ScoreGraphs(net) if cuda_graphs else None
    kw = dict(pad_id=pad_id, batch_size=args.eval_batch, fixed_shapes=cuda_graphs, graphs=graphs)
    predict_labels(net, prompts if cuda_graphs else prompts[:args.eval_batch], candidates, labels, **kw)
    sync(device)
    t0 = time.perf_counter()
    predict_labels(net, prompts, candidates, labels, **kw)
    sync(device)
    return len(prompts) / (time.perf_counter() - t0)


def model_config(args, vocab_size: int | None) -> ModelConfig:
    """The architecture both systems build: a preset (vocabulary from the tokenizer) or the checkpoint's."""
    if Path(args.model).is_dir():
        path = Path(args.model) / "config.json"
        if not path.is_file():
            raise SystemExit(f"--model {args.model}: the HF baseline needs an HF-layout checkpoint (config.json); "
                             "convert a Meta checkpoint with `python -m llama_erc.engine.convert`")
        return from_hf_config(json.loads(path.read_text()), source=str(path))
    cfg = preset(args.model)
    return replace(cfg, vocab_size=vocab_size) if vocab_size else cfg


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rt = setup_runtime(args.device, args.dtype, args.kernels)
    args.dtype, args.dtype_reason = rt.dtype_name, rt.dtype_reason  # the report records what ran, and why
    if rt.dtype_reason:
        print(f"dtype: {rt.dtype_reason}", flush=True)
    device = rt.device
    codec = erc_codec(args) if args.mode == "erc" else None
    pad_id = codec.pad_id if codec else 0
    mcfg = model_config(args, codec.vocab_size if codec else None)
    n_seqs = (args.warmup + args.steps) * args.micro_batch
    seqs = (erc_sequences(args, codec) if args.mode == "erc"
            else fixed_sequences(n_seqs, args.seq_len, mcfg.vocab_size, args.seed))
    batches = [[seqs[(i * args.micro_batch + j) % len(seqs)] for j in range(args.micro_batch)]
               for i in range(args.warmup + args.steps)]  # the same batches, in the same order, for every system
    peak_tflops = matmul_tflops(device, rt.dtype)
    runs = [(("ours" if len(args.variants) == 1 else f"ours[{v.spec}]"), v) for v in args.variants
            if "ours" in args.systems] + [(n, None) for n in (BASELINE, "hf_peft_fp32") if n in args.systems]
    date = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    name_of_device = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    slug = "".join(ch if ch.isalnum() else "-" for ch in name_of_device).strip("-").lower()[:40]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"bench-{args.mode}-{slug}-{date[:19].replace(':', '')}"

    systems, failed, evals = {}, {}, {}
    for i, (name, variant) in enumerate(runs):
        _memory_start(device)
        try:  # one configuration failing (say, a compiler error) must not cost the others' numbers
            if variant is not None:
                net, _ = build_ours(args, variant, rt, codec.vocab_size if codec else None)
                step = ours_step(net, args, variant, rt, pad_id)
            else:
                net = build_hf(args, mcfg, rt, lora_targets(args), fp32_adapters=name == "hf_peft_fp32")
                step = hf_step(net, args, rt, pad_id)
            resident_gb = _memory_start(device)
            net.train()
            if variant is not None and variant.compile:
                # compilation happens in the first calls, and again (dynamic shapes) when the row length first
                # changes: two untimed passes over the warm-up batches keep it out of the measured steps (the
                # peak memory includes them)
                for seqs in batches[:args.warmup] * 2:
                    step(seqs)
            if variant is not None and variant.cuda_graphs and device.type == "cuda":
                # each batch shape is captured the first time it occurs: one untimed pass over every batch
                # captures all the shapes the measured steps replay (the peak memory includes the captures)
                for seqs in batches:
                    step(seqs)
            systems[name] = {**time_training(step, batches, args.warmup, mcfg, device, peak_tflops),
                             "resident_gb_at_start": resident_gb, "variant": variant and variant.spec}
            print(f"{name}: {systems[name]['tokens_per_s']:.0f} tokens/s, step "
                  f"{1e3 * systems[name]['step_s']:.1f} ms", flush=True)
            first_ours = variant is not None and "ours_utt_per_s" not in evals
            first_graphs = (variant is not None and variant.cuda_graphs and device.type == "cuda"
                            and "ours_graphs_utt_per_s" not in evals)
            if args.mode == "erc" and args.eval_examples and (first_ours or first_graphs or name == BASELINE):
                prompts, candidates, words, labels = eval_data(args, codec)
                evals["n_examples"] = len(prompts)
                if first_ours:
                    evals["ours_utt_per_s"] = time_ours_eval(net, prompts, candidates, labels, args, pad_id, device)
                    evals["ours_system"] = name
                if first_graphs:  # the same model's scoring, each fixed-shape batch a replayed CUDA graph
                    evals["ours_graphs_utt_per_s"] = time_ours_eval(net, prompts, candidates, labels, args, pad_id,
                                                                    device, cuda_graphs=True)
                    evals["ours_graphs_system"] = name
                if variant is None:
                    evals["hf_utt_per_s"], evals["hf_matched_fraction"] = time_hf_eval(
                        net, prompts, candidates, words, args, codec.tok, device)
        except Exception as e:  # noqa: BLE001 - reported in the JSON and on stderr, then the next system runs
            if len(runs) == 1:
                raise
            failed[name] = f"{type(e).__name__}: {e}"
            print(f"{name}: FAILED {failed[name]}", file=sys.stderr, flush=True)
        net = step = None  # noqa: F841 - drop the system before the next one is built
        report = build_report(args, rt, mcfg, batches, runs, systems, failed, evals, peak_tflops, date,
                              complete=i == len(runs) - 1, lora_targets=lora_targets(args))
        stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        stem.with_suffix(".md").write_text(markdown(report))
    _memory_start(device)
    print(markdown(report) + f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
