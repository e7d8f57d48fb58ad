"""Label-restricted decoding: packed scoring equals scoring each candidate in its own plain forward pass."""
import dataclasses

import pytest
import torch

from llama_erc.engine.batching import segment_mask
from llama_erc.engine.decode import pack_prompt_with_candidates, predict_labels, score_candidates
from llama_erc.engine.packing import common_prefix
from llama_erc.model import Transformer, preset


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
    mask = segment_mask(torch.tensor([[0] * 5 + [-1]]), torch.tensor([row.owner + [-1]]))[0]
    assert mask[4].tolist() == [True, True, False, False, True, False]  # cand 1 sees the prompt and itself
    assert mask[3].tolist() == [True, True, True, True, False, False]
    assert mask[5].tolist() == [False] * 5 + [True]  # padding sees only itself


def test_candidate_mask_with_shared_prefix_and_two_examples():
    # row: prefix (2) | example 0: prompt (1), cand 0 (1) | example 1: prompt (2), cand 0 (1) | pad
    example = torch.tensor([[-2, -2, 0, 0, 1, 1, 1, -1]])
    owner = torch.tensor([[-1, -1, -1, 0, -1, -1, 0, -1]])
    m = segment_mask(example, owner)[0].int().tolist()
    assert m[1] == [1, 1, 0, 0, 0, 0, 0, 0]  # the prefix sees only the prefix
    assert m[3] == [1, 1, 1, 1, 0, 0, 0, 0]  # example 0's candidate: prefix, its prompt, itself
    assert m[6] == [1, 1, 0, 0, 1, 1, 1, 0]  # example 1's candidate never sees example 0
    assert m[7] == [0] * 7 + [1]
    row = pack_prompt_with_candidates([1, 2, 3, 4], [[7, 8]], start=2)
    assert row.ids == [3, 4, 7, 8] and row.positions == [2, 3, 4, 5] and row.targets == [(0, 1, 7), (0, 2, 8)]


@pytest.mark.parametrize("batch_size,max_row_len", [(1, 1024), (4, 1024), (4, 24), (8, 8)])
def test_shared_prefix_rows_score_like_separate_forwards(batch_size, max_row_len):
    """Prompts that share an instruction, several examples a row (or one a row when rows are short)."""
    torch.manual_seed(0)
    model = Transformer(preset("tiny")).eval()
    model.init_weights(std=0.2, generator=torch.Generator().manual_seed(0))
    instruction = [1, 50, 51, 52, 53, 54]
    prompts = [instruction + rest for rest in ([60], [61, 62, 63], [60, 64], [65, 66, 67, 68, 69], [60, 64, 70])]
    prompts.append(instruction[:3] + [71, 72])  # shares only part of the instruction
    candidates = [[300, 2], [300, 301, 2], [302, 2]]
    got = score_candidates(model, prompts, candidates, pad_id=0, batch_size=batch_size, max_row_len=max_row_len)
    want = torch.tensor([[_naive_score(model, p, c) for c in candidates] for p in prompts])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_common_prefix_keeps_a_token_of_each_prompt():
    assert common_prefix([[1, 2, 3], [1, 2, 3]]) == 2
    assert common_prefix([[1, 2, 3, 4], [1, 2, 5]]) == 2
    assert common_prefix([[1], [1, 2]]) == 0
    assert common_prefix([[4, 2], [1, 2]]) == 0


def test_predict_set_scores_longest_first_and_answers_in_split_order(demo_tokenizer):
    """predict_set batches prompts by length; its answers are the split's order and equal scoring each example
    alone (the order changes which examples share a forward pass, never an example's own scores)."""
    from llama_erc.data import LABELS, build_codec, encode_prompt, encode_response, load_dialogues, load_tokenizer
    from llama_erc.data.prompts import PromptConfig, build_examples
    from llama_erc.data.sets import ExampleSet
    from llama_erc.engine.evaluate import predict_set
    from tests.data.conftest import DEMO

    codec = build_codec(load_tokenizer(demo_tokenizer))
    examples = build_examples(load_dialogues("meld", DEMO, "test")[:3], "meld", PromptConfig())
    lengths = [len(encode_prompt(codec, ex, 256)) for ex in examples]
    assert lengths != sorted(lengths, reverse=True)  # the split's order is not already longest first
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(preset("tiny"), vocab_size=codec.vocab_size)).eval()
    model.init_weights(std=0.2, generator=torch.Generator().manual_seed(0))
    eset = ExampleSet("meld", examples, LABELS["meld"])
    preds, probs = predict_set(model, codec, eset, max_len=256, batch_size=4)
    candidates = [encode_response(codec, w) for w in examples[0].choices]
    reserve = max(len(c) for c in candidates)  # predict_set truncates prompts to leave room for any label
    for i, ex in enumerate(examples):
        prompt = encode_prompt(codec, ex, 256, n_reserved=reserve)
        label, p = predict_labels(model, [prompt], candidates, list(eset.labels),
                                  pad_id=codec.pad_id)
        torch.testing.assert_close(probs[i:i + 1], p, rtol=1e-4, atol=1e-5)
        assert preds[i] == label[0]
