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


def _instruction_prompts():
    instruction = [1, 50, 51, 52, 53, 54, 55, 56]
    return [instruction + rest for rest in ([60], [61, 62, 63], [60, 64], [65, 66, 67, 68, 69], [60, 64, 70])]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("max_row_len", [1024, 20])
def test_cached_prefix_scores_like_the_prefix_in_every_row(dtype, tol, max_row_len):
    """The instruction's keys and values computed once a batch (prefix_cache, the default) score as its tokens
    held at the start of every row (the twin), in fp32 and bf16, one row or several (max_row_len 20)."""
    torch.manual_seed(0)
    model = Transformer(preset("tiny")).eval()
    model.init_weights(std=0.2, generator=torch.Generator().manual_seed(0))
    model = model.to(dtype)
    prompts, candidates = _instruction_prompts(), [[300, 2], [300, 301, 2], [302, 2]]
    got = score_candidates(model, prompts, candidates, pad_id=0, batch_size=8, max_row_len=max_row_len)
    want = score_candidates(model, prompts, candidates, pad_id=0, batch_size=8, max_row_len=max_row_len,
                            prefix_cache=False)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    if dtype == torch.float32:
        assert got.argmax(-1).tolist() == want.argmax(-1).tolist()


def test_cached_prefix_is_computed_once_a_batch_and_rows_hold_none_of_it(monkeypatch):
    torch.manual_seed(0)
    model = Transformer(preset("tiny")).eval()
    prompts, candidates = _instruction_prompts(), [[300, 2], [302, 2]]
    calls, rows = [], []
    encode, hidden = model.encode_prefix, model.hidden_states
    monkeypatch.setattr(model, "encode_prefix", lambda t: calls.append(t.tolist()) or encode(t))
    monkeypatch.setattr(model, "hidden_states", lambda ids, *a, **k: rows.append(ids) or hidden(ids, *a, **k))
    score_candidates(model, prompts, candidates, pad_id=0, batch_size=8, max_row_len=20)
    assert calls == [[prompts[0][:8]]]  # once, the 8 shared tokens (the 9th differs)
    assert rows[0].shape[0] > 1 and not (rows[0][:, :8] == torch.tensor(prompts[0][:8])).all(-1).any()


@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_encode_prefix_then_hidden_states_equal_one_causal_pass(n_kv_heads):
    cfg = preset("tiny")
    cfg = dataclasses.replace(cfg, n_kv_heads=n_kv_heads or cfg.n_heads)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    model.init_weights(std=0.2, generator=torch.Generator().manual_seed(0))
    tokens = torch.randint(3, cfg.vocab_size, (2, 11))
    tokens[1, :5] = tokens[0, :5]
    with torch.no_grad():
        full = model.hidden_states(tokens)  # (2, 11, D), causal
        kv = model.encode_prefix(tokens[:1, :5])
        after = model.hidden_states(tokens[:, 5:], prefix=kv)  # default mask and positions 5..10
    torch.testing.assert_close(after, full[:, 5:], rtol=1e-5, atol=1e-5)
    assert len(kv) == cfg.n_layers and kv[0][0].shape == (1, cfg.n_kv_heads, 5, cfg.head_dim)


def test_prefix_refuses_training_and_wrong_shapes():
    model = Transformer(preset("tiny")).eval()
    kv = model.encode_prefix(torch.tensor([[1, 2, 3]]))
    tokens = torch.tensor([[4, 5]])
    with pytest.raises(ValueError, match="inference"):
        model.hidden_states(tokens, prefix=kv)  # grad enabled
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"\(B, T, P \+ T\) = \(1, 2, 5\)"):
            model.hidden_states(tokens, mask=torch.ones(1, 2, 2, dtype=torch.bool), prefix=kv)
        with pytest.raises(ValueError, match="layers"):
            model.hidden_states(tokens, prefix=kv[:-1])
    with pytest.raises(ValueError, match=r"one non-empty row"):
        model.encode_prefix(torch.tensor([[1, 2], [3, 4]]))


# ---------------------------------------------------------------- fixed shapes (eval with --cuda_graphs)

@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("prefix_cache", [True, False])
@pytest.mark.parametrize("batch_size,max_row_len", [(8, 1024), (8, 20), (3, 1024)])
def test_fixed_shape_batches_score_like_unpadded(dtype, tol, prefix_cache, batch_size, max_row_len):
    """Padded rows, columns, prefix tokens and targets change no real score (fp32 to 1e-5, bf16 within its
    rounding), with the prefix cached or in every row, one row or several."""
    torch.manual_seed(0)
    model = Transformer(preset("tiny")).eval()
    model.init_weights(std=0.2, generator=torch.Generator().manual_seed(0))
    model = model.to(dtype)
    prompts = _instruction_prompts() + [[1, 50, 51, 80, 81]]  # the last batch of 3 shares a shorter prefix
    candidates = [[300, 2], [300, 301, 2], [302, 2]]
    kw = dict(pad_id=0, batch_size=batch_size, max_row_len=max_row_len, prefix_cache=prefix_cache)
    got = score_candidates(model, prompts, candidates, fixed_shapes=True, **kw)
    want = score_candidates(model, prompts, candidates, **kw)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    if dtype == torch.float32:
        assert got.argmax(-1).tolist() == want.argmax(-1).tolist()


def test_fixed_shape_batch_layout():
    from llama_erc.engine.decode import build_score_batch

    prompts, candidates = _instruction_prompts(), [[300, 2], [302, 2]]  # 8 shared tokens, 5 prompts
    plain = build_score_batch(prompts, 10, candidates, pad_id=0, max_row_len=24)
    sb = build_score_batch(prompts, 10, candidates, pad_id=0, max_row_len=24, fixed_shape=True)
    R, T = plain.ids.shape
    assert R == 3 and sb.ids.shape == (4, 16) and sb.prefix.shape == (1, 16) and sb.mask.shape == (4, 16, 32)
    assert sb.prefix[0, :8].tolist() == prompts[0][:8] and (sb.prefix[0, 8:] == 0).all()
    assert not sb.mask[:, :, 8:16].any()  # the padded prefix tokens: seen by no query
    assert sb.mask[:, :, :8].all()  # the real prefix: seen by every query, pads included
    n = len(plain.example)
    assert len(sb.rows) == 32 and n == 20 and len(sb.example) == n  # 5 prompts x (2 + 2) target tokens
    assert torch.equal(sb.ids[:R, :T], plain.ids) and torch.equal(sb.mask[:R, :T, 16:16 + T], plain.mask[:, :, 8:])
    assert (sb.rows[n:] == 0).all() and (sb.cols[n:] == 0).all() and (sb.tokens[n:] == 0).all()
    assert torch.equal(sb.example, plain.example) and sb.example.min() == 10  # indices into the whole list


def test_predict_set_with_cuda_graphs_runs_fixed_shapes_on_cpu(demo_tokenizer, monkeypatch):
    """On a CPU, --cuda_graphs scores the fixed-shape batches eagerly (no capture) with the same predictions."""
    from llama_erc.data import LABELS, build_codec, load_dialogues, load_tokenizer
    from llama_erc.data.prompts import PromptConfig, build_examples
    from llama_erc.data.sets import ExampleSet
    from llama_erc.engine import decode, evaluate
    from tests.data.conftest import DEMO

    codec = build_codec(load_tokenizer(demo_tokenizer))
    examples = build_examples(load_dialogues("meld", DEMO, "test")[:3], "meld", PromptConfig())
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(preset("tiny"), vocab_size=codec.vocab_size)).eval()
    model.init_weights(std=0.2, generator=torch.Generator().manual_seed(0))
    eset = ExampleSet("meld", examples, LABELS["meld"])
    shapes = []
    build = decode.build_score_batch
    monkeypatch.setattr(decode, "build_score_batch", lambda *a, **k: shapes.append(k["fixed_shape"]) or build(*a, **k))
    preds, probs = evaluate.predict_set(model, codec, eset, max_len=256, batch_size=4, cuda_graphs=True)
    assert shapes and all(shapes)
    want_preds, want = evaluate.predict_set(model, codec, eset, max_len=256, batch_size=4)
    torch.testing.assert_close(probs, want, rtol=1e-5, atol=1e-6)
    assert preds == want_preds


def test_score_graphs_refuse_a_model_off_cuda():
    from llama_erc.engine.graphs import ScoreGraphs

    with pytest.raises(ValueError, match="CUDA device, got cpu"):
        ScoreGraphs(Transformer(preset("tiny")))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_captured_scoring_matches_eager_cuda(dtype):
    """ScoreGraphs' replays against the eager fixed-shape scoring: several shapes (batches of 8 and 3 prompts,
    rows of 20 tokens), each captured once and replayed for the batches of the same shape."""
    from llama_erc.engine.graphs import ScoreGraphs

    torch.manual_seed(0)
    model = Transformer(preset("tiny")).eval()
    model.init_weights(std=0.2, generator=torch.Generator().manual_seed(0))
    model = model.to("cuda", dtype)
    prompts = _instruction_prompts() * 3 + [[1, 50, 51, 80, 81]]
    candidates = [[300, 2], [300, 301, 2], [302, 2]]
    kw = dict(pad_id=0, batch_size=8, max_row_len=20)
    graphs = ScoreGraphs(model)
    got = score_candidates(model, prompts, candidates, graphs=graphs, **kw)
    want = score_candidates(model, prompts, candidates, fixed_shapes=True, **kw)
    assert len(graphs.graphs) >= 2
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
