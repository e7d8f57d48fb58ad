"""Example -> token ids with loss labels, truncation, right-padded batches, and (prompt, response) JSONL.

Sequence layout (T = len(prompt ids) + len(response ids)), in the prompt format of data/prompt_format.py
(alpaca shown; chat wraps the prompt in the model's chat template and ends the answer with its end-of-turn token):
    input_ids = [BOS] + encode(prompt) + encode(response) + [EOS]
    labels    = [-100] * (1 + len(prompt ids)) + encode(response) + [EOS]
Every function takes a PromptCodec, or a bare tokenizer, which means the alpaca format.
labels are aligned with input_ids (HF convention): the loss compares logits[:, :-1] with labels[:, 1:], so
every response token and the EOS are supervised and nothing before them is.
Truncation: while the sequence is longer than max_len, the oldest context turns go first, then the few-shot
demonstrations (last one first); the instruction, the target and the response are never cut. If it still
does not fit, `encode_example` raises and names the example.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from data.files import read_jsonl
from data.prompt_format import PromptCodec, build_codec
from data.prompts import Example, PromptParts, render_prompt, with_context
from data.schema import DataError, where

IGNORE_INDEX = -100    # cross-entropy's ignore_index: prompt and pad positions


def _name(example: Example | PromptParts | str) -> str:
    if isinstance(example, Example):
        return f"{example.dataset} dialogue {example.dialogue_id!r} utterance {example.utterance_index}"
    text = render_prompt(example) if isinstance(example, PromptParts) else example
    return f"prompt {text[:60]!r}..."


def as_codec(tok) -> PromptCodec:
    """A PromptCodec as it is; a bare tokenizer as the default (alpaca) format."""
    return tok if isinstance(tok, PromptCodec) else build_codec(tok, "alpaca")


def encode_response(tok, response: str) -> list[int]:
    """Response ids + the end token (EOS, or the chat template's end of turn), encoded on their own (prompt_format.py)."""
    return as_codec(tok).response_ids(response)


def encode_prompt(tok, example: Example | PromptParts | str, max_len: int, n_reserved: int = 0) -> list[int]:
    """BOS + prompt ids, truncated (oldest context first) so that len + n_reserved <= max_len.

    Decoding reserves the longest label's length (+ EOS) and encodes the prompt once for all labels.
    Raises ValueError naming the example when even the bare prompt does not fit.
    """
    codec = as_codec(tok)
    parts = example.parts if isinstance(example, Example) else example
    prompt = example.prompt if isinstance(example, Example) else example
    budget = max_len - n_reserved
    if not isinstance(parts, PromptParts):   # a plain string cannot be re-rendered: fit or fail
        ids = codec.prompt_ids(prompt)
        if len(ids) > budget:
            raise ValueError(f"{_name(example)}: prompt is {len(ids)} tokens, only {budget} fit in "
                             f"max_len={max_len} with {n_reserved} reserved; it has no parts to truncate")
        return ids

    def fits(n_turns: int, n_demos: int | None = None) -> list[int] | None:
        ids = codec.prompt_ids(render_prompt(with_context(parts, n_turns, n_demos)))
        return ids if len(ids) <= budget else None

    n_context, n_demos = len(parts.context), len(parts.demonstrations)
    ids = fits(n_context)
    if ids is not None:   # the common case: one encode
        return ids
    # Token count grows with the number of turns kept: binary-search the most turns that fit.
    lo, hi, best = 0, n_context - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        found = fits(mid)
        if found is not None:
            best, lo = found, mid + 1
        else:
            hi = mid - 1
    if best is not None:
        return best
    for k in range(n_demos - 1, -1, -1):   # no context left: drop demonstrations, the last first
        found = fits(0, k)
        if found is not None:
            return found
    bare = len(codec.prompt_ids(render_prompt(with_context(parts, 0, 0))))
    raise ValueError(f"{_name(example)}: does not fit in max_len={max_len}: the prompt without context or "
                     f"demonstrations is {bare} tokens and {n_reserved} more are needed for the response")


def encode_example(tok, example: Example | tuple[str | PromptParts, str],
                   max_len: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels), both of length <= max_len; see the module docstring for the layout.
    `example` is an Example or a (prompt or PromptParts, response) pair."""
    tok = as_codec(tok)
    prompt, response = (example, example.response) if isinstance(example, Example) else example
    response_ids = encode_response(tok, response)
    # Reserve room for the longest label word, as decoding does (engine/evaluate.py), so a prompt near
    # max_len is truncated the same way in training and in evaluation whatever its own label.
    choices = example.choices if isinstance(example, Example) else ()
    reserve = max([len(response_ids)] + [len(encode_response(tok, w)) for w in choices])
    prompt_ids = encode_prompt(tok, prompt, max_len, n_reserved=reserve)
    return prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids


def pad_batch(pairs: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row. Returns int64 tensors:
    input_ids (B, T) padded with pad_id; labels (B, T) padded with -100; lengths (B,) real lengths."""
    if not pairs:
        raise ValueError("pad_batch: empty batch")
    for i, (ids, labels) in enumerate(pairs):
        if len(ids) != len(labels) or not ids:
            raise ValueError(f"pad_batch: row {i} has {len(ids)} ids and {len(labels)} labels")
    n_rows, n_cols = len(pairs), max(len(ids) for ids, _ in pairs)
    input_ids = torch.full((n_rows, n_cols), pad_id, dtype=torch.long)    # (B, T)
    labels = torch.full((n_rows, n_cols), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for i, (ids, lab) in enumerate(pairs):
        input_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[i, :len(lab)] = torch.tensor(lab, dtype=torch.long)
    lengths = torch.tensor([len(ids) for ids, _ in pairs], dtype=torch.long)  # (B,)
    return {"input_ids": input_ids, "labels": labels, "lengths": lengths}


def load_prompt_response_jsonl(path: str | Path, dataset: str = "prompt_response") -> list[Example]:
    """Supervised examples from a JSONL file of {"prompt": ..., "response": ...} lines (other keys ignored).
    No PromptParts, so these are never truncated: too long is an error at encoding time. The response is
    tokenized on its own (leading space), so end prompts the way prompts.py does, e.g. with "Answer:"."""
    path = Path(path)
    examples = []
    for line, obj in read_jsonl(path):
        for key in ("prompt", "response"):
            if not isinstance(obj.get(key), str) or not obj[key].strip():
                raise DataError(f"{where(path, line)}: {key!r} must be a non-empty string, got {obj.get(key)!r}")
        examples.append(Example(prompt=obj["prompt"], response=obj["response"].strip(),
                                label=obj["response"].strip(), dataset=dataset,
                                dialogue_id=f"{path.name}:{line}", utterance_index=0))
    if not examples:
        raise DataError(f"{path}: no prompt/response lines")
    return examples
