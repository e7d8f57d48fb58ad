"""The embedded demo's first step: a sentencepiece tokenizer and a tiny LLaMA trained from scratch on CPU.

    python -m llama_erc.demo.tiny --out runs/demo/base

reads the bundled demo dialogues (llama_erc/demo/meld_format, MELD's CSV format, synthetic text written for this
project), trains a small BPE tokenizer on them, pre-trains a ~1M-parameter LLaMA on the dialogue transcripts
(plain next-token prediction over speaker lines; the emotion labels are NOT shown), and saves it in Meta's
safetensors layout (params.json + model.safetensors + tokenizer.model). train.py then fine-tunes LoRA
adapters on it for emotion recognition exactly as it would LLaMA-2-7B, and eval.py evaluates them.
It is a demo model: it shows the whole pipeline working, not LLaMA-2's accuracy.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from llama_erc.data import MELD_LABELS, PromptConfig, build_examples, load_dialogues, train_tokenizer
from llama_erc.demo.pretrained import DEMO_DATA
from llama_erc.model import ModelConfig, Transformer
from llama_erc.model.config import to_meta_params



def transcripts(dialogues) -> list[str]:
    return ["\n".join(f"{u.speaker}: {u.text}" for u in d.utterances) for d in dialogues]


def pretrain(texts: list[str], tok, cfg: ModelConfig, *, steps: int, batch: int, seq: int, lr: float,
             seed: int) -> Transformer:
    """Full-parameter next-token training on the concatenated token stream, fp32, AdamW, cosine lr."""
    torch.manual_seed(seed)
    stream = torch.tensor([t for text in texts for t in tok.encode(text, bos=True, eos=True)])  # (N,)
    if len(stream) <= seq + 1:
        raise ValueError(f"demo corpus has {len(stream)} tokens, fewer than one sequence of {seq}")
    model = Transformer(cfg)
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + torch.cos(torch.tensor(step / steps * torch.pi))).item()
        starts = torch.randint(0, len(stream) - seq - 1, (batch,), generator=gen)
        window = torch.stack([stream[s:s + seq + 1] for s in starts.tolist()])  # (batch, seq + 1)
        logits = model(window[:, :-1])  # (batch, seq, V)
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size).float(), window[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % 50 == 0 or step == 0:
            print(f"pretrain step {step + 1}/{steps} | loss {loss.item():.3f} | {time.perf_counter() - t0:.0f}s",
                  flush=True)
    return model


def tokenizer_corpus(dialogues) -> list[str]:
    """Transcripts, plus the prompt template and label words (as LLaMA's tokenizer covers English)."""
    prompts = [e.prompt + " " + e.response for e in build_examples(dialogues[:20], "meld", PromptConfig())]
    return transcripts(dialogues) + prompts + list(MELD_LABELS)


def save_base(model: Transformer, out: Path) -> None:
    """Meta's safetensors layout (form 1 of model/load.py): params.json + model.safetensors."""
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    (out / "params.json").write_text(json.dumps(to_meta_params(model.config), indent=2))


def build_base(dialogues, out: Path, *, vocab_size: int, dim: int, n_layers: int, n_heads: int, hidden_dim: int,
               steps: int, batch: int = 16, seq: int = 128, lr: float = 3e-3, seed: int = 0) -> dict:
    """Tokenizer + tiny LLaMA pre-trained on the dialogues' transcripts, saved to `out`; returns timings/sizes."""
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tok = train_tokenizer(tokenizer_corpus(dialogues), vocab_size, out / "tokenizer.model")
    t_tok = time.perf_counter() - t0
    cfg = ModelConfig(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_heads, hidden_dim=hidden_dim,
                      vocab_size=tok.vocab_size, max_seq_len=512)
    texts = transcripts(dialogues)
    n_tokens = sum(len(tok.encode(t, bos=True, eos=True)) for t in texts)
    print(f"tokenizer: {tok.vocab_size} pieces; corpus {n_tokens:,} tokens; model {cfg.n_params:,} parameters; "
          f"pre-training {steps} steps", flush=True)
    t0 = time.perf_counter()
    model = pretrain(texts, tok, cfg, steps=steps, batch=batch, seq=seq, lr=lr, seed=seed)
    t_pre = time.perf_counter() - t0
    save_base(model, out)
    print(f"wrote {out}/params.json, model.safetensors, tokenizer.model", flush=True)
    return {"tokenizer_s": t_tok, "pretrain_s": t_pre, "vocab_size": tok.vocab_size, "n_params": cfg.n_params,
            "corpus_tokens": n_tokens, "model": to_meta_params(cfg)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/demo/base"))
    p.add_argument("--data", type=Path, default=DEMO_DATA)
    p.add_argument("--vocab_size", type=int, default=512)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    print("DEMO: a tiny LLaMA trained from scratch on synthetic dialogues, to exercise the real pipeline on CPU; "
          "its scores say nothing about LLaMA-2-7B.", flush=True)
    build_base(load_dialogues("meld", args.data, "train"), args.out, vocab_size=args.vocab_size, dim=128,
               n_layers=4, n_heads=4, hidden_dim=352, steps=args.steps, seed=args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
