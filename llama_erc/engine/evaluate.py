"""Evaluate a model on ERC example sets: label-restricted predictions, metrics, and the files eval.py writes."""
from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from llama_erc.data import ExampleSet, PromptCodec, encode_prompt, encode_response
from llama_erc.engine.decode import predict_labels
from llama_erc.engine.graphs import ScoreGraphs
from llama_erc.engine.metrics import classification_report, confusion_png, report_text


def _progress(done: int, total: int, t0: float, enabled: bool) -> None:
    if not enabled:
        return
    width = 30
    filled = int(width * done / max(1, total))
    rate = done / max(1e-9, time.perf_counter() - t0)
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {rate:.1f} utt/s")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def subset(examples: list, max_examples: int) -> list:
    """At most max_examples, evenly spaced over the split (not its first dialogues), deterministically."""
    if not max_examples or max_examples >= len(examples):
        return examples
    step = len(examples) / max_examples
    return [examples[int(i * step)] for i in range(max_examples)]


@torch.no_grad()
def predict_set(model: nn.Module, codec: PromptCodec, eset: ExampleSet, *, max_len: int, batch_size: int = 8,
                max_examples: int = 0, progress: bool = False,
                cuda_graphs: bool = False) -> tuple[list[str], torch.Tensor]:
    """Predicted canonical label per example, and probabilities over eset.labels (N, C), in eset's order.

    The examples are scored longest prompt first, batch_size at a time, so a batch holds prompts of similar
    length: its rows pack tightly and its shared instruction prefix (computed once a batch, decode.py) is most
    of every prompt. Each example's scores depend on its own prompt only (decode.py's masks), so the order
    changes no prediction. cuda_graphs: every batch padded to a fixed shape (decode.build_score_batch), each
    shape's forward captured once and replayed on CUDA (graphs.ScoreGraphs); run eagerly elsewhere.
    """
    examples = subset(eset.examples, max_examples)
    words = examples[0].choices
    candidates = [encode_response(codec, w) for w in words]  # label word + EOS, exactly as trained
    reserve = max(len(c) for c in candidates)
    prompts = [encode_prompt(codec, ex, max_len, n_reserved=reserve) for ex in examples]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # stable: ties keep the split's order
    probs = torch.empty(len(prompts), len(eset.labels))
    on_cuda = cuda_graphs and next(model.parameters()).device.type == "cuda"
    graphs = ScoreGraphs(model) if on_cuda else None  # one per call: it holds the weights' addresses
    t0 = time.perf_counter()
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        _, p = predict_labels(model, [prompts[i] for i in chunk], candidates, list(eset.labels),
                              pad_id=codec.pad_id, batch_size=batch_size, fixed_shapes=cuda_graphs, graphs=graphs)
        probs[chunk] = p
        _progress(start + len(chunk), len(order), t0, progress)
    preds = [eset.labels[i] for i in probs.argmax(-1).tolist()]
    return preds, probs


def evaluate_sets(model: nn.Module, codec: PromptCodec, sets: list[ExampleSet], *, max_len: int, batch_size: int = 8,
                  max_examples: int = 0, cuda_graphs: bool = False) -> dict:
    """Dev metrics during training: per dataset, and their mean weighted F1 (the model-selection criterion)."""
    out: dict = {}
    for eset in sets:
        preds, _ = predict_set(model, codec, eset, max_len=max_len, batch_size=batch_size, max_examples=max_examples,
                               cuda_graphs=cuda_graphs)
        gold = [ex.label for ex in subset(eset.examples, max_examples)]
        rep = classification_report(gold, preds, list(eset.labels))
        out[f"{eset.dataset}_accuracy"] = rep["accuracy"]
        out[f"{eset.dataset}_weighted_f1"] = rep["weighted_f1"]
        out[f"{eset.dataset}_macro_f1"] = rep["macro_f1"]
    out["weighted_f1"] = sum(out[f"{s.dataset}_weighted_f1"] for s in sets) / len(sets)
    return out


def write_eval_outputs(out_dir: Path, eset: ExampleSet, preds: list[str], probs: torch.Tensor, title: str,
                       max_examples: int = 0, extra: dict | None = None) -> dict:
    """predictions.csv, report.json, report.txt (metrics + confusion matrix), confusion.png. `extra` is added to
    report.json as is. predictions.csv holds the model's own label probabilities and the prediction made
    (after calibration, when there is one)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    examples = subset(eset.examples, max_examples)
    gold = [ex.label for ex in examples]
    rep = classification_report(gold, preds, list(eset.labels))
    with (out_dir / "predictions.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["dialogue_id", "utterance_index", "gold", "pred", *[f"p_{x}" for x in eset.labels]])
        for ex, pred, p in zip(examples, preds, probs.tolist()):
            w.writerow([ex.dialogue_id, ex.utterance_index, ex.label, pred, *[f"{v:.6f}" for v in p]])
    (out_dir / "report.json").write_text(json.dumps({"title": title, **rep, **(extra or {})}, indent=2))
    (out_dir / "report.txt").write_text(f"{title}\n{report_text(rep)}")
    confusion_png(rep["confusion_matrix"], list(eset.labels), out_dir / "confusion.png", title=title)
    return rep
