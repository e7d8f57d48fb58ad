"""Label-restricted decoding: packed scoring equals scoring each candidate in its own plain forward pass."""
import torch

from engine.decode import candidate_mask, pack_prompt_with_candidates, predict_labels, score_candidates
from model import Transformer, preset


def _naive_score(model, prompt, cand):
    ids = torch.tensor([prompt + cand])
    logp = torch.log_softmax(model(ids).float(), -1)[0]  # (T, V)
    return sum(logp[len(prompt) - 1 + j, tok].item() for j, tok in enumerate(cand))


def test_packed_scores_equal_separate_forwards():
    torch.manual_seed(0)
    model = Transformer(preset("tiny")).eval()
    model.init_weights(std=0.2, generator=torch.Generator().manual_seed(0))  # peaked, prefix-sensitive logits
    prompts = [[1, 40, 41, 42], [1, 7, 8, 9, 10, 11, 12], [1, 99]]
    # prefix-sharing candidates, as `sad` + EOS vs `sad` `ness` + EOS
    candidates = [[300, 2], [300, 301, 2], [302, 2], [300, 301, 303, 2]]
    got = score_candidates(model, prompts, candidates, pad_id=0, batch_size=2)
    want = torch.tensor([[_naive_score(model, p, c) for c in candidates] for p in prompts])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    labels, probs = predict_labels(model, prompts, candidates, ["sad", "sadness", "joy", "sadnesses"], pad_id=0)
    assert labels == [["sad", "sadness", "joy", "sadnesses"][i] for i in want.argmax(-1).tolist()]
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))


def test_candidate_mask_isolates_candidates():
    row = pack_prompt_with_candidates([5, 6], [[7, 8], [9]])
    assert row.ids == [5, 6, 7, 8, 9] and row.positions == [0, 1, 2, 3, 2]
    assert row.targets == [(0, 1, 7), (0, 2, 8), (1, 1, 9)]
    mask = candidate_mask(torch.tensor([row.owner + [-2]]))[0]
    assert mask[4].tolist() == [True, True, False, False, True, False]  # cand 1 sees the prompt and itself
    assert mask[3].tolist() == [True, True, True, True, False, False]
    assert mask[5].tolist() == [False] * 5 + [True]  # padding sees only itself
