"""Example -> token ids with loss labels, with truncation; and (prompt, response) JSONL examples.

Sequence layout (T = len(prompt ids) + len(response ids)), in the prompt format of data/codec.py
(alpaca shown; chat wraps the prompt in the model's chat template and ends the answer with its end-of-turn token):
    input_ids = [BOS] + encode(prompt) + encode(response) + [EOS]
    labels    = [-100] * (1 + len(prompt ids)) + encode(response) + [EOS]
Every function takes a PromptCodec (data/codec.py); a bare tokenizer is taken as its alpaca codec.
labels are aligned with input_ids (HF convention): the loss compares logits[:, :-1] with labels[:, 1:], so
every response token and the EOS are supervised and nothing before them is.
Truncation: while the sequence is longer than max_len, the oldest context turns go first, then the few-shot
demonstrations (last one first); the instruction, the target and the response are never cut. If it still
does not fit, `encode_example` raises and names the example.
"""
from __future__ import annotations

from pathlib import Path

from llama_erc.data.codec import PromptCodec, build_codec
from llama_erc.data.files import read_jsonl
from llama_erc.data.prompts import Example, PromptParts, render_prompt, with_context
from llama_erc.data.schema import DataError, where
from llama_erc.data.tokenizers import Tokenizer

IGNORE_INDEX = -100    # cross-entropy's ignore_index: prompt and pad positions


def _name(example: Example | PromptParts | str) -> str:
    if isinstance(example, Example):
        return f"{example.dataset} dialogue {example.dialogue_id!r} utterance {example.utterance_index}"
    text = render_prompt(example) if isinstance(example, PromptParts) else example
    return f"prompt {text[:60]!r}..."


def as_codec(codec: PromptCodec | Tokenizer) -> PromptCodec:
    """A PromptCodec as it is; a bare tokenizer as its default (alpaca) codec."""
    return codec if isinstance(codec, PromptCodec) else build_codec(codec, "alpaca")


def encode_response(codec: PromptCodec, response: str) -> list[int]:
    """Response ids + the end token (EOS, or the chat template's end of turn), encoded on their own (codec.py)."""
    return as_codec(codec).response_ids(response)


def encode_prompt(codec: PromptCodec, example: Example | PromptParts | str, max_len: int,
                  n_reserved: int = 0) -> list[int]:
    """BOS + prompt ids, truncated (oldest context first) so that len + n_reserved <= max_len.

    Decoding reserves the longest label's length (+ EOS) and encodes the prompt once for all labels.
    Raises ValueError naming the example when even the bare prompt does not fit.
    """
    codec = as_codec(codec)
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


def encode_example(codec: PromptCodec, example: Example | tuple[str | PromptParts, str],
                   max_len: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels), both of length <= max_len; see the module docstring for the layout.
    `example` is an Example or a (prompt or PromptParts, response) pair."""
    codec = as_codec(codec)
    prompt, response = (example, example.response) if isinstance(example, Example) else example
    response_ids = encode_response(codec, response)
    # Reserve room for the longest label word, as decoding does (engine/evaluate.py), so a prompt near
    # max_len is truncated the same way in training and in evaluation whatever its own label.
    choices = example.choices if isinstance(example, Example) else ()
    reserve = max([len(response_ids)] + [len(encode_response(codec, w)) for w in choices])
    prompt_ids = encode_prompt(codec, prompt, max_len, n_reserved=reserve)
    return prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids


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
