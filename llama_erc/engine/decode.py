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
from llama_erc.engine.packing import bucket_rows, bucket_slots, common_prefix, first_fit_decreasing


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


@dataclass(frozen=True)
class ScoreBatch:
    """One forward pass of label scoring, built on the host. `inputs` go to score_batch (or a captured graph);
    example / candidate say whose score each of the first n token log-probabilities adds to."""
    ids: Tensor  # (R, T) long
    positions: Tensor  # (R, T) long
    mask: Tensor  # (R, T, P + T) bool with a cached prefix, else (R, T, T): "query may see key"
    prefix: Tensor | None  # (1, P) long: the shared prefix, computed once (Transformer.encode_prefix); or None
    rows: Tensor  # (N,) long: the row of each position whose logits predict a candidate token
    cols: Tensor  # (N,) long: its column
    tokens: Tensor  # (N,) long: the token it predicts
    example: Tensor  # (n,) long: the prompt (index into the whole list) each of the first n targets belongs to
    candidate: Tensor  # (n,) long: and its candidate

    @property
    def inputs(self) -> tuple[Tensor | None, ...]:
        return self.ids, self.positions, self.mask, self.prefix, self.rows, self.cols, self.tokens


def build_score_batch(chunk: list[list[int]], first: int, candidates: list[list[int]], *, pad_id: int,
                      max_row_len: int = 1024, prefix_cache: bool = True, fixed_shape: bool = False) -> ScoreBatch:
    """The prompts `chunk` (the whole list's chunk[0] is prompt `first`) and every candidate, packed into rows of
    at most max_row_len tokens with the shared prefix counted in (or the longest single example, if longer).

    fixed_shape (eval with CUDA graphs): rows R to a power of two (bucket_rows), columns T, the cached prefix P
    and the targets N each to a power of two >= 16. Added rows and columns are padding (a pad sees only itself
    and the real prefix), added prefix tokens are hidden from every query, added targets read row 0, column 0,
    token 0 and are dropped: the real targets' log-probabilities are what the unpadded batch gives.
    """
    P = common_prefix(chunk)
    items = [pack_prompt_with_candidates(p, candidates, P) for p in chunk]
    rows = first_fit_decreasing([len(it.ids) for it in items], max(max_row_len, P + max(len(it.ids)
                                                                                     for it in items)) - P)
    lead = 0 if prefix_cache and P else P  # the prefix's tokens in every row, unless cached
    T = max(lead + sum(len(items[i].ids) for i in row) for row in rows)
    R, Pk = len(rows), P - lead  # Pk: cached prefix length (0 when held in the rows or when there is none)
    if fixed_shape:
        R, T, Pk = bucket_rows(R), bucket_slots(T), bucket_slots(Pk) if Pk else 0  # powers of two >= 16
    ids = torch.full((R, T), pad_id, dtype=torch.long)
    pos = torch.zeros((R, T), dtype=torch.long)
    example = torch.full((R, T), PAD_SEGMENT, dtype=torch.long)
    owner = torch.full((R, T), PROMPT, dtype=torch.long)
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
            at += [(first + i, k, r, col + j, tok) for k, j, tok in it.targets]
            col += n
    mask = segment_mask(example, owner)  # (R, T, T): the shared prefix, the own prompt, the own candidate
    prefix = None
    if Pk:  # every query (pads too: no empty softmax row) also sees the real cached prefix, never its padding
        prefix = torch.full((1, Pk), pad_id, dtype=torch.long)
        prefix[0, :P] = torch.tensor(chunk[0][:P], dtype=torch.long)
        seen = (torch.arange(Pk) < P).expand(R, T, Pk)
        mask = torch.cat([seen, mask], dim=2)  # (R, T, Pk + T)
    ex_idx, cand_idx, row_idx, col_idx, tok = (torch.tensor(c, dtype=torch.long) for c in zip(*at))
    if fixed_shape:  # added targets: row 0, column 0, token 0, dropped by the caller (example/candidate are n long)
        extra = bucket_slots(len(at)) - len(at)
        row_idx, col_idx, tok = (torch.cat([t, t.new_zeros(extra)]) for t in (row_idx, col_idx, tok))
    return ScoreBatch(ids, pos, mask, prefix, row_idx, col_idx, tok, ex_idx, cand_idx)


def score_batch(model: nn.Module, ids: Tensor, positions: Tensor, mask: Tensor, prefix: Tensor | None,
                rows: Tensor, cols: Tensor, tokens: Tensor) -> Tensor:
    """ScoreBatch.inputs (on the model's device) -> (N,) fp32 log-probability of each target token. Only the
    positions that predict a candidate token reach the vocabulary projection. No host sync: capturable."""
    kv = model.encode_prefix(prefix) if prefix is not None else None
    h = model.hidden_states(ids, positions, mask, prefix=kv)  # (R, T, D)
    logp = torch.log_softmax(model.output(h[rows, cols]).float(), dim=-1)  # (N, vocab)
    return logp.gather(1, tokens[:, None])[:, 0]


@torch.no_grad()
def score_candidates(model: nn.Module, prompts: list[list[int]], candidates: list[list[int]], *,
                     pad_id: int, batch_size: int = 8, max_row_len: int = 1024, prefix_cache: bool = True,
                     fixed_shapes: bool = False, graphs=None) -> Tensor:
    """Summed log-probability of each candidate after each prompt: (N, C) fp32 on CPU.

    batch_size examples go through one forward pass (build_score_batch, score_batch); prefix_cache: the module
    docstring (both ways pack the same rows and attend over the same keys). fixed_shapes pads every batch to a
    few shapes; graphs (engine/graphs.py ScoreGraphs, CUDA only; implies fixed_shapes) replays each shape's
    captured score_batch instead of running it.
    """
    device = next(model.parameters()).device
    scores = torch.zeros(len(prompts), len(candidates))
    for start in range(0, len(prompts), batch_size):
        sb = build_score_batch(prompts[start:start + batch_size], start, candidates, pad_id=pad_id,
                               max_row_len=max_row_len, prefix_cache=prefix_cache,
                               fixed_shape=fixed_shapes or graphs is not None)
        if graphs is not None:
            token_logp = graphs(sb.inputs)
        else:
            token_logp = score_batch(model, *(None if t is None else t.to(device) for t in sb.inputs))
        n = len(sb.example)
        scores.index_put_((sb.example, sb.candidate), token_logp[:n].cpu(), accumulate=True)
    return scores


def predict_labels(model: nn.Module, prompts: list[list[int]], candidates: list[list[int]], labels: list[str],
                   *, pad_id: int, batch_size: int = 8, fixed_shapes: bool = False,
                   graphs=None) -> tuple[list[str], Tensor]:
    """-> predicted label per prompt, and the probability over labels (N, C) (softmax of the scores).
    fixed_shapes, graphs: score_candidates."""
    if len(labels) != len(candidates):
        raise ValueError(f"{len(labels)} labels but {len(candidates)} candidate sequences")
    scores = score_candidates(model, prompts, candidates, pad_id=pad_id, batch_size=batch_size,
                              fixed_shapes=fixed_shapes, graphs=graphs)
    probs = torch.softmax(scores, dim=-1)
    return [labels[i] for i in probs.argmax(-1).tolist()], probs
