"""Does llama.cpp apply our LoRA adapter file to the SmolLM2 GGUF as our model does? Logits side by side.

    pip install llama-cpp-python     # optional, not a project dependency: builds llama.cpp from source
                                     # (about 10 minutes on 2 cores; PyPI has no wheel of it)
    python scripts/llamacpp_adapter_check.py [--run runs/meld_smollm2_gguf/lora] [--n-threads 2]
                                             [--out-json benchmarks/results/llamacpp_adapter_smollm2_cpu.json]

Each adapter is a llama.cpp LoRA GGUF (model/llamacpp_lora.py): adapters drawn at random with --seed on all seven
linears (always), and a trained run's `llamacpp-adapter.gguf` (--run, a run on `--base_quant gguf`). The same
token ids (prompts written here, in SmolLM2's chat layout) go through
  * ours:      the GGUF's own blocks dequantized in fp32 (`load_pretrained(base_quant="gguf")`), the adapter file read
               back with `read_llamacpp_lora` and merged (deq(Wq) + alpha/r B A, `merge_lora`);
  * llama.cpp: `Llama(model_path=<base>, lora_path=<adapter>)`, fp32 KV cache, every position's logits,
and the base without an adapter through both. llama.cpp runs on two bases:
  * the Q4_1 file itself, as served. Its quantized matmuls round the activations to 8 bits (Q8_1), so llama.cpp
    and we never agree bit for bit there: the base row is that noise floor;
  * an F32 copy of it (every tensor dequantized by gguf.quants.dequantize, metadata as is, written to a temporary
    file): the very weights our gguf base computes with, multiplied in fp32 by llama.cpp, so any difference left
    is how the adapter is applied.
The check is that the adapter's effect, logits(adapted) - logits(base), is the same in both. Two controls show
the comparison can fail: our side with the adapter's alpha doubled, and with wq/wk's B rows put in HF's
rotate-half order (the permutation llama.cpp's converter applies to HF q/k, which a Meta-order adapter must not
get). `agrees`, for the F32 copy only: the base's logits within 1e-4 (relative RMS), the adapter's effect within
1e-3, and each control at least 100x the effect's error. On the Q4_1 file the numbers are reported without a
verdict: llama.cpp's 8-bit activation rounding sets how close it can come there, so a threshold would be a
statement about that noise, not about the adapter. How the thresholds came to be, in order: the first run asked
the Q4_1 effect to be within 5% with the same top token at 98% of positions (the random adapter's effect, RMS 10.5
logits, came within 5.8%, top token 92.9%, on a base floor of 2.7%), which is why the F32 copy was added; its
first version asked each control to be over 0.2 in absolute terms, and the trained adapter's q/k control came to
0.14 against an effect error of 4e-6, so the control floor became a ratio to the effect's error.
The JSON holds, per base and adapter, max |diff|, relative RMS and top-1 agreement of the logits, the effect's
relative error and cosine, the controls' errors and `agrees`. Paths in it are relative to the repository.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from run_common import ROOT, git_state, machine

from llama_erc.benchmarks.provenance import repo_relative
from llama_erc.data.tokenizers import find_tokenizer, load_tokenizer
from llama_erc.demo.pretrained import smollm2_gguf
from llama_erc.model import apply_lora, load_pretrained
from llama_erc.model.hf_keys import permute_to_hf
from llama_erc.model.llamacpp_lora import export_llamacpp_lora, read_llamacpp_lora
from llama_erc.model.lora import VALID_TARGETS, LoRAConfig, lora_state_dict, merge_lora

# Written for this check (no corpus text): SmolLM2's chat layout around short made-up dialogue turns.
PROMPTS = (
    "<|im_start|>system\nYou label the emotion of the last utterance.<|im_end|>\n<|im_start|>user\n"
    "Dana: I left the keys on the bus again.\nMilo: Again? That is the third time this month!\n"
    "Which emotion does Milo feel?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nRowan: We finally got the apartment with the big window.\n"
    "Tess: No way, that is wonderful news.<|im_end|>\n<|im_start|>assistant\nTess sounds",
    "The lighthouse keeper counted the ships every evening and wrote their names in a small green book.",
)
# `agrees` on the F32 copy (see the docstring): base and effect relative errors, controls over the effect's error
BASE_TOL, EFFECT_TOL, CONTROL_FACTOR = 1e-4, 1e-3, 100.0


def f32_copy(src: Path, dst: Path) -> Path:
    """The GGUF with every tensor dequantized to F32 (gguf.quants.dequantize, the spec our twins match bit for
    bit) and its metadata as it is (general.file_type: all F32): the weights deq(Wq) our gguf base computes with,
    which llama.cpp then multiplies in fp32 instead of rounding activations to 8 bits."""
    import gguf  # the optional extra our GGUF loader uses

    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(dst), arch=arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":  # the writer writes these itself
            continue
        if key == "general.file_type":
            writer.add_file_type(gguf.LlamaFileType.ALL_F32)
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type),
                                                       dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def ours_logits(model: torch.nn.Module, prompts: list[list[int]]) -> list[np.ndarray]:
    with torch.no_grad():
        return [model(torch.tensor([ids]))[0].float().numpy() for ids in prompts]


def cpp_logits(gguf: Path, adapter: Path | None, prompts: list[list[int]], n_threads: int) -> list[np.ndarray]:
    from llama_cpp import GGML_TYPE_F32, Llama  # optional: see the docstring

    n_ctx = max(map(len, prompts)) + 8
    llm = Llama(model_path=str(gguf), lora_path=str(adapter) if adapter else None, n_ctx=n_ctx, n_batch=n_ctx,
                n_ubatch=n_ctx, logits_all=True, n_threads=n_threads, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32,
                flash_attn=False, verbose=False)
    out = []
    for ids in prompts:
        llm.reset()
        llm.eval(ids)
        out.append(np.array(llm.scores[:len(ids)], dtype=np.float32))
    return out


def _sig(x) -> float:
    return float(f"{float(x):.3g}")  # three significant digits: the errors span 1e-6 to 1


def compare(a: list[np.ndarray], b: list[np.ndarray]) -> dict:
    """a against b (the reference): max |a - b|, RMS(a - b) / RMS(b), share of positions with the same top token."""
    a, b = np.concatenate(a), np.concatenate(b)
    rel = float(np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(b ** 2)))
    return {"max_abs_diff": _sig(np.abs(a - b).max()), "rel_rms": _sig(rel),
            "top1_agree": round(float(np.mean(a.argmax(-1) == b.argmax(-1))), 4)}


def effect(cpp_a, cpp_b, our_a, our_b) -> dict:
    """llama.cpp's adapter effect (adapted - base logits) against ours: relative RMS error and cosine."""
    d_cpp = np.concatenate([x - y for x, y in zip(cpp_a, cpp_b)]).ravel().astype(np.float64)
    d_our = np.concatenate([x - y for x, y in zip(our_a, our_b)]).ravel().astype(np.float64)
    return {"rms_ours": _sig(np.sqrt(np.mean(d_our ** 2))),
            "rel_err": _sig(np.linalg.norm(d_cpp - d_our) / np.linalg.norm(d_our)),
            "cosine": round(float(d_cpp @ d_our / (np.linalg.norm(d_cpp) * np.linalg.norm(d_our))), 6)}


def random_adapter(gguf: Path, out: Path, seed: int, rank: int, scale: float) -> Path:
    """LoRA r=rank on all seven linears with A ~ N(0, 1/in) and B ~ N(0, scale^2 / r): a non-trivial adapter."""
    model = apply_lora(load_pretrained(gguf, dtype=torch.float32, base_quant="gguf"),
                       LoRAConfig(rank=rank, alpha=2.0 * rank, dropout=0.0, targets=VALID_TARGETS), verbose=False)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, p in lora_state_dict(model).items():
        fan = p.shape[1]  # A: (r, in) -> 1/sqrt(in); B: (out, r) -> scale/sqrt(r)
        std = fan ** -0.5 if key.endswith("lora_a") else scale * fan ** -0.5
        tensors[key] = std * torch.randn(p.shape, generator=g)
    return export_llamacpp_lora(tensors, LoRAConfig(rank=rank, alpha=2.0 * rank, dropout=0.0,
                                                    targets=VALID_TARGETS), out, base_name=gguf.stem)


def our_adapted(gguf: Path, adapter: Path, prompts: list[list[int]], *, alpha_factor: float = 1.0,
                hf_qk_rows: bool = False) -> list[np.ndarray]:
    """Our merged model's logits with the adapter file's tensors (optionally spoiled for the controls)."""
    tensors, alpha = read_llamacpp_lora(adapter)
    rank = next(iter(tensors.values())).shape[0]
    targets = tuple(t for t in VALID_TARGETS if any(f".{t}.lora_a" in k for k in tensors))
    model = apply_lora(load_pretrained(gguf, dtype=torch.float32, base_quant="gguf"),
                       LoRAConfig(rank=rank, alpha=alpha * alpha_factor, dropout=0.0, targets=targets),
                       verbose=False)
    heads = {"wq": model.config.n_heads, "wk": model.config.n_kv_heads}
    with torch.no_grad():
        for key, p in lora_state_dict(model).items():
            t = tensors[key]
            lin = key.split(".")[-2]
            if hf_qk_rows and lin in heads and key.endswith("lora_b"):
                t = permute_to_hf(t, heads[lin])  # B's rows index W's output rows
            p.copy_(t)
    merge_lora(model)
    return ours_logits(model.eval(), prompts)


def agrees(row: dict, base: dict) -> bool:
    err = row["effect"]["rel_err"]
    return base["rel_rms"] <= BASE_TOL and err <= EFFECT_TOL and min(row["controls"].values()) >= CONTROL_FACTOR * err


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", type=Path, default=None, help="a --base_quant gguf run's out_dir (its llamacpp-adapter.gguf)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--scale", type=float, default=0.5, help="std of the random B, times 1/sqrt(r)")
    p.add_argument("--n-threads", type=int, default=os.cpu_count())
    p.add_argument("--out-json", type=Path,
                   default=ROOT / "benchmarks" / "results" / "llamacpp_adapter_smollm2_cpu.json")
    a = p.parse_args(argv)
    try:
        import llama_cpp
    except ImportError:
        print("llama_cpp is not installed: pip install llama-cpp-python (builds llama.cpp; not a project dependency)")
        return 2
    gguf = smollm2_gguf()
    adapters = {}
    if a.run is not None:
        path = a.run / "llamacpp-adapter.gguf"
        if not path.is_file():
            print(f"{path}: no llama.cpp adapter (train.py writes one for a --base_quant gguf run)")
            return 2
        adapters["trained"] = path
    t0 = time.perf_counter()
    tok = load_tokenizer(find_tokenizer(gguf))
    prompts = [tok.encode_special(text) for text in PROMPTS]
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
              "git": git_state(), "llama_cpp_python": llama_cpp.__version__, "model": repo_relative(gguf),
              "prompt_tokens": [len(ids) for ids in prompts], "n_threads": a.n_threads,
              "thresholds_f32_copy": {"base_rel_rms_max": BASE_TOL, "effect_rel_err_max": EFFECT_TOL,
                                      "control_over_effect_error_min": CONTROL_FACTOR},
              "bases": {}}
    our_base = ours_logits(load_pretrained(gguf, dtype=torch.float32, base_quant="gguf").eval(), prompts)
    with tempfile.TemporaryDirectory() as tmp:
        adapters["random"] = random_adapter(gguf, Path(tmp) / "random.gguf", a.seed, a.rank, a.scale)
        ours = {name: (our_adapted(gguf, path, prompts), {
            "alpha_doubled": our_adapted(gguf, path, prompts, alpha_factor=2.0),
            "qk_rows_hf_order": our_adapted(gguf, path, prompts, hf_qk_rows=True)}) for name, path in adapters.items()}
        bases = {"q4_1_file": gguf, "f32_copy": f32_copy(gguf, Path(tmp) / "f32.gguf")}
        for base_name, base_file in bases.items():
            cpp_base = cpp_logits(base_file, None, prompts, a.n_threads)
            entry = result["bases"][base_name] = {"base": compare(cpp_base, our_base), "adapters": {}}
            print(f"{base_name}: base (no adapter), llama.cpp vs ours: {entry['base']}", flush=True)
            for name, path in adapters.items():
                our, spoiled = ours[name]
                cpp = cpp_logits(base_file, path, prompts, a.n_threads)
                row = {"file": repo_relative(path) if name == "trained" else f"random (seed {a.seed}, r={a.rank}, "
                       f"all seven linears, B std {a.scale}/sqrt(r))",
                       "adapted": compare(cpp, our), "effect": effect(cpp, cpp_base, our, our_base),
                       "controls": {c: effect(cpp, cpp_base, o, our_base)["rel_err"] for c, o in spoiled.items()}}
                if base_name == "f32_copy":
                    row["agrees"] = agrees(row, entry["base"])
                entry["adapters"][name] = row
                print(f"{base_name} / {name}: {json.dumps(row)}", flush=True)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    a.out_json.parent.mkdir(parents=True, exist_ok=True)
    a.out_json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {repo_relative(a.out_json)}")
    return 0 if all(r["agrees"] for r in result["bases"]["f32_copy"]["adapters"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
