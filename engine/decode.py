"""Label-restricted decoding: score every candidate label's full token sequence after the prompt, take the best.

One forward pass per example scores all C candidates: the row is  prompt | cand_1 | cand_2 | ... | cand_C,
each candidate sees the whole prompt and its own earlier tokens only (never another candidate), and its
positions continue from the prompt's end, as if it were the only continuation. So the prompt is encoded
once per example, and labels that share token prefixes (`sad` and `sadness`, which end differently: one
with EOS, the other with more pieces) are still scored exactly:

    score(c) = sum_j log p(c_j | prompt, c_<j),      p(label) = softmax over candidates of score

A prediction is therefore always one of the labels, unlike free generation followed by string matching.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .batching import causal_mask


@dataclass(frozen=True)
class PackedRow:
    ids: list[int]  # prompt followed by every candidate
    positions: list[int]
    owner: list[int]  # -1 for prompt tokens, k for tokens of candidate k
    targets: list[tuple[int, int, int]]  # (candidate k, position whose logits predict, token id)


def pack_prompt_with_candidates(prompt: list[int], candidates: list[list[int]]) -> PackedRow:
    if not prompt:
        raise ValueError("empty prompt: a candidate needs at least one token to condition on")
    ids, positions, owner, targets = list(prompt), list(range(len(prompt))), [-1] * len(prompt), []
    for k, cand in enumerate(candidates):
        if not cand:
            raise ValueError(f"candidate {k} has no tokens")
        prev = len(prompt) - 1  # the first candidate token is predicted from the prompt's last position
        for j, tok in enumerate(cand):
            targets.append((k, prev, tok))
            prev = len(ids)
            ids.append(tok)
            positions.append(len(prompt) + j)
            owner.append(k)
    return PackedRow(ids, positions, owner, targets)


def candidate_mask(owner: Tensor) -> Tensor:
    """owner: (B, T), -1 = prompt, k = candidate k, -2 = padding -> bool (B, T, T) query-may-see-key.

    A query sees earlier keys of the prompt and earlier keys of its own candidate; padding sees itself only
    (so no row of the softmax is empty).
    """
    q, k = owner[:, :, None], owner[:, None, :]  # (B, T, 1), (B, 1, T)
    return causal_mask((k == -1) | (k == q), owner != -2)


@torch.no_grad()
def score_candidates(model: nn.Module, prompts: list[list[int]], candidates: list[list[int]], *,
                     pad_id: int, batch_size: int = 8) -> Tensor:
    """Summed log-probability of each candidate after each prompt: (N, C) fp32 on CPU."""
    device = next(model.parameters()).device
    scores = torch.empty(len(prompts), len(candidates))
    for start in range(0, len(prompts), batch_size):
        rows = [pack_prompt_with_candidates(p, candidates) for p in prompts[start:start + batch_size]]
        T = max(len(r.ids) for r in rows)
        ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
        pos = torch.zeros((len(rows), T), dtype=torch.long)
        owner = torch.full((len(rows), T), -2, dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r.ids)
            ids[i, :n], pos[i, :n], owner[i, :n] = torch.tensor(r.ids), torch.tensor(r.positions), torch.tensor(r.owner)
        mask = candidate_mask(owner)
        h = model.hidden_states(ids.to(device), pos.to(device), mask.to(device))  # (b, T, D)
        # only the positions that predict a candidate token reach the vocabulary projection
        row_idx = torch.tensor([i for i, r in enumerate(rows) for _ in r.targets], device=device)
        col_idx = torch.tensor([t[1] for r in rows for t in r.targets], device=device)
        tok = torch.tensor([t[2] for r in rows for t in r.targets], device=device)
        logp = torch.log_softmax(model.output(h[row_idx, col_idx]).float(), dim=-1)  # (n_targets, V)
        token_logp = logp.gather(1, tok[:, None])[:, 0].cpu()  # (n_targets,)
        block = torch.zeros(len(rows), len(candidates))
        flat = [(i, t[0]) for i, r in enumerate(rows) for t in r.targets]
        block.index_put_((torch.tensor([f[0] for f in flat]), torch.tensor([f[1] for f in flat])), token_logp,
                         accumulate=True)
        scores[start:start + len(rows)] = block
    return scores


def predict_labels(model: nn.Module, prompts: list[list[int]], candidates: list[list[int]], labels: list[str],
                   *, pad_id: int, batch_size: int = 8) -> tuple[list[str], Tensor]:
    """-> predicted label per prompt, and the probability over labels (N, C) (softmax of the scores)."""
    if len(labels) != len(candidates):
        raise ValueError(f"{len(labels)} labels but {len(candidates)} candidate sequences")
    scores = score_candidates(model, prompts, candidates, pad_id=pad_id, batch_size=batch_size)
    probs = torch.softmax(scores, dim=-1)
    return [labels[i] for i in probs.argmax(-1).tolist()], probs
