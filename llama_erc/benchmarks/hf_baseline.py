"""The reference system bench.py measures against: transformers LlamaForCausalLM (SDPA) + PEFT LoRA.

Built from the same model config, LoRA config, optimizer and batches as ours (bench.py's docstring), and timed
for evaluation the way the DialogueLLM paper decodes: HF generate with beam search (4 beams), then string
matching of the generated text against the label words. transformers and peft are test/benchmark
references only; the engine never imports this module.
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch

from llama_erc.data import Sequence, Tokenizer
from llama_erc.engine.batching import padded_batch
from llama_erc.engine.optim import OptimConfig, make_optimizer, trainable_parameters
from llama_erc.model.hf_keys import LINEAR_META_TO_HF

HF_SHORT = {meta: hf.rsplit(".", 1)[1] for meta, hf in LINEAR_META_TO_HF.items()}  # wq -> q_proj


def sync(device: torch.device) -> None:
    """Wait for the device, so that a host clock read after it times the work queued before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_hf(args, mcfg, rt, targets: tuple[str, ...], fp32_adapters: bool):
    """LlamaForCausalLM (SDPA, checkpointing) + PEFT LoRA with the same config as ours."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    if Path(args.model).is_dir():
        hf = LlamaForCausalLM.from_pretrained(args.model, dtype=rt.dtype, attn_implementation="sdpa").to(rt.device)
    else:
        hc = LlamaConfig(hidden_size=mcfg.dim, intermediate_size=mcfg.hidden_dim, num_hidden_layers=mcfg.n_layers,
                         num_attention_heads=mcfg.n_heads, num_key_value_heads=mcfg.n_kv_heads,
                         vocab_size=mcfg.vocab_size, rms_norm_eps=mcfg.norm_eps, rope_theta=mcfg.rope_theta,
                         max_position_embeddings=max(mcfg.max_seq_len, args.max_len, args.seq_len),
                         tie_word_embeddings=False, attn_implementation="sdpa")
        torch.manual_seed(args.seed)
        with torch.device(rt.device):  # built where it runs, directly in its dtype: never a 7B model on CPU
            hf = LlamaForCausalLM._from_config(hc, dtype=rt.dtype)
    hf.config.use_cache = False
    if args.checkpointing == "on" and hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5.x
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif args.checkpointing == "on":
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lc = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                    target_modules=[HF_SHORT[t] for t in targets], task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # PEFT 0.21 calls transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(hf, lc, autocast_adapter_dtype=fp32_adapters)


def hf_step(pm, args, rt, pad_id: int):
    params = trainable_parameters(pm)
    opt = make_optimizer(params, OptimConfig(lr=args.lr))

    def step(seqs: list[Sequence]) -> torch.Tensor:
        batch = padded_batch(seqs, pad_id)  # ids, labels (b, T): right-padded, as a data collator pads
        ids, labels = batch.ids, batch.labels
        lengths = torch.tensor([len(s.ids) for s in seqs])
        attn = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()  # (b, T)
        out = pm(input_ids=ids.to(rt.device), attention_mask=attn.to(rt.device), labels=labels.to(rt.device))
        out.loss.backward()  # mean over the batch's supervised tokens, the same normalisation as ours
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.item(), batch.n_tokens  # the tokens it computed (pads aside)
    return step


def match_label(text: str, words: tuple[str, ...]) -> int:
    """Index of the label word generated text names first (the longer word on a tie: sadness over sad), or -1."""
    t = text.strip().lower()
    hits = [(t.find(w.lower()), -len(w), i) for i, w in enumerate(words) if w.lower() in t]
    return min(hits)[2] if hits else -1


@torch.no_grad()
def time_hf_eval(pm, prompts, candidates, words, args, tok: Tokenizer, device) -> tuple[float, float]:
    """-> (utterances/s, fraction of generations that named a label)."""
    pm.eval()
    max_new = args.max_new_tokens or max(len(c) for c in candidates)

    def generate(chunk: list[list[int]]) -> list[str]:
        T = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), T), tok.pad_id, dtype=torch.long)
        attn = torch.zeros((len(chunk), T), dtype=torch.long)
        for i, p in enumerate(chunk):  # left padding, as decoder-only generation needs
            ids[i, T - len(p):], attn[i, T - len(p):] = torch.tensor(p), 1
        out = pm.generate(input_ids=ids.to(device), attention_mask=attn.to(device), num_beams=4, do_sample=False,
                          max_new_tokens=max_new, early_stopping=True, use_cache=True, pad_token_id=tok.pad_id,
                          eos_token_id=tok.eos_id, bos_token_id=tok.bos_id)
        return [tok.decode(row[T:].tolist()) for row in out]

    generate(prompts[:args.eval_batch])
    sync(device)
    t0 = time.perf_counter()
    matched = 0
    for start in range(0, len(prompts), args.eval_batch):
        matched += sum(match_label(t, words) >= 0 for t in generate(prompts[start:start + args.eval_batch]))
    sync(device)
    return len(prompts) / (time.perf_counter() - t0), matched / len(prompts)
