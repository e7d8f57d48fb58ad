"""Label-restricted decoding: score every candidate label's full token sequence after the prompt, take the best.

One forward pass scores all C candidates of a batch of examples. Each example contributes  prompt | cand_1 |
cand_2 | ... | cand_C; each candidate sees its example's whole prompt and its own earlier tokens only (never
another candidate), and its positions continue from the prompt's end, as if it were the only continuation.
So the prompt is encoded once per example, and labels that share token prefixes (`sad` and `sadness`, which
end differently: one with EOS, the other with more pieces) are still scored exactly:

    score(c) = sum_j log p(c_j | prompt, c_<j),      p(label) = softmax over candidates of score

The batch's examples are packed into rows (first-fit decreasing). The prompts' common prefix (the instruction
every DialogueLLM prompt starts with) is computed once per batch: its keys and values (Transformer.encode_prefix)
are put in front of every row's, and every example sees them (prefix_cache=True, the default):

    [prefix keys] + prompt_0 rest | cands of 0 | prompt_1 rest | cands of 1 | ... | pad

With prefix_cache=False the prefix is held as tokens at the start of each row instead, as in training
(engine/packing.py): the twin the cached path is tested against.

A prediction is therefore always one of the labels, unlike free generation followed by string matching.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from llama_erc.engine.batching import PAD_SEGMENT, PROMPT, SHARED_SEGMENT, segment_mask
from llama_erc.engine.packing import common_prefix, first_fit_decreasing


@dataclass(frozen=True)
class PackedRow:
    """One example's part of a row: its prompt after the shared prefix, then every candidate."""
    ids: list[int]
    positions: list[int]
    owner: list[int]  # PROMPT for prompt tokens, k for tokens of candidate k
    targets: list[tuple[int, int, int]]  # (candidate k, index whose logits predict, token id), indices in ids


def pack_prompt_with_candidates(prompt: list[int], candidates: list[list[int]], start: int = 0) -> PackedRow:
    """The example's tokens from prompt[start:] on (the first `start` are the row's shared prefix)."""
    if len(prompt) <= start:
        raise ValueError(f"prompt of {len(prompt)} tokens: a candidate needs a prompt token after the {start} "
                         "shared ones to condition on")
    ids, owner, targets = list(prompt[start:]), [PROMPT] * (len(prompt) - start), []
    positions = list(range(start, len(prompt)))
    for k, cand in enumerate(candidates):
        if not cand:
            raise ValueError(f"candidate {k} has no tokens")
        prev = len(prompt) - start - 1  # the first candidate token is predicted from the prompt's last position
        for j, tok in enumerate(cand):
            targets.append((k, prev, tok))
            prev = len(ids)
            ids.append(tok)
            positions.append(len(prompt) + j)
            owner.append(k)
    return PackedRow(ids, positions, owner, targets)


@torch.no_grad()
def score_candidates(model: nn.Module, prompts: list[list[int]], candidates: list[list[int]], *,
                     pad_id: int, batch_size: int = 8, max_row_len: int = 1024, prefix_cache: bool = True) -> Tensor:
    """Summed log-probability of each candidate after each prompt: (N, C) fp32 on CPU.

    batch_size examples go through one forward pass, packed into rows of at most max_row_len tokens with the
    shared prefix counted in (or the longest single example, if that is longer); prefix_cache: the module
    docstring. Both ways pack the same rows and attend over the same keys.
    """
    device = next(model.parameters()).device
    scores = torch.zeros(len(prompts), len(candidates))
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        P = common_prefix(chunk)
        items = [pack_prompt_with_candidates(p, candidates, P) for p in chunk]
        rows = first_fit_decreasing([len(it.ids) for it in items], max(max_row_len, P + max(len(it.ids)
                                                                                         for it in items)) - P)
        lead = 0 if prefix_cache and P else P  # the prefix's tokens in every row, unless cached
        T = max(lead + sum(len(items[i].ids) for i in row) for row in rows)
        ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
        pos = torch.zeros((len(rows), T), dtype=torch.long)
        example = torch.full((len(rows), T), PAD_SEGMENT, dtype=torch.long)
        owner = torch.full((len(rows), T), PROMPT, dtype=torch.long)
        at: list[tuple[int, int, int, int, int]] = []  # (example, candidate, row, column, token) per target
        for r, row in enumerate(rows):
            ids[r, :lead] = torch.tensor(chunk[0][:lead], dtype=torch.long)  # the shared prefix, once a row
            pos[r, :lead] = torch.arange(lead)
            example[r, :lead] = SHARED_SEGMENT
            col = lead
            for e, i in enumerate(row):
                it, n = items[i], len(items[i].ids)
                ids[r, col:col + n], pos[r, col:col + n] = torch.tensor(it.ids), torch.tensor(it.positions)
                example[r, col:col + n], owner[r, col:col + n] = e, torch.tensor(it.owner)
                at += [(start + i, k, r, col + j, tok) for k, j, tok in it.targets]
                col += n
        mask = segment_mask(example, owner)  # (rows, T, T): the shared prefix, the own prompt, the own candidate
        if lead == P:
            h = model.hidden_states(ids.to(device), pos.to(device), mask.to(device))  # (rows, T, D)
        else:  # every query (pads too: no empty softmax row) also sees the whole cached prefix
            kv = model.encode_prefix(torch.tensor([chunk[0][:P]], device=device))
            mask = torch.cat([torch.ones(len(rows), T, P, dtype=torch.bool), mask], dim=2)  # (rows, T, P + T)
            h = model.hidden_states(ids.to(device), pos.to(device), mask.to(device), prefix=kv)  # (rows, T, D)
        # only the positions that predict a candidate token reach the vocabulary projection
        ex_idx, cand_idx, row_idx, col_idx, tok = (torch.tensor(c) for c in zip(*at))
        logp = torch.log_softmax(model.output(h[row_idx.to(device), col_idx.to(device)]).float(), dim=-1)
        token_logp = logp.gather(1, tok.to(device)[:, None])[:, 0].cpu()  # (n_targets,)
        scores.index_put_((ex_idx, cand_idx), token_logp, accumulate=True)
    return scores


def predict_labels(model: nn.Module, prompts: list[list[int]], candidates: list[list[int]], labels: list[str],
                   *, pad_id: int, batch_size: int = 8) -> tuple[list[str], Tensor]:
    """-> predicted label per prompt, and the probability over labels (N, C) (softmax of the scores)."""
    if len(labels) != len(candidates):
        raise ValueError(f"{len(labels)} labels but {len(candidates)} candidate sequences")
    scores = score_candidates(model, prompts, candidates, pad_id=pad_id, batch_size=batch_size)
    probs = torch.softmax(scores, dim=-1)
    return [labels[i] for i in probs.argmax(-1).tolist()], probs
