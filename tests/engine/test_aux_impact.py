"""The emotion-impact auxiliary task: weighted supervised loss (sum w CE / sum w), its layouts, and training data."""
import json

import pytest
import torch

from llama_erc.data import load_tokenizer
from llama_erc.data import DataConfig, Sequence, fingerprint, training_data
from llama_erc.engine.batching import padded_batch
from llama_erc.engine.loop import train_loop
from llama_erc.engine.loss import SupervisedLoss
from llama_erc.engine.optim import lr_at
from llama_erc.engine.packing import pack

from tests.engine.helpers import (ADAM_EPS, base_cfg, live_model, loss_and_grads, padded, synthetic_sequences,
                                   tiny_setup)

ALPHA = 0.3


def _weighted(seqs: list[Sequence]) -> list[Sequence]:
    """Every other sequence an auxiliary one (weight ALPHA), all sharing a 10-token prompt prefix."""
    prefix = tuple(range(40, 50))
    return [Sequence(prefix + s.ids, (-100,) * len(prefix) + s.labels, weight=ALPHA if i % 2 else 1.0)
            for i, s in enumerate(seqs)]


def _adapters(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _weighted_mean_loss(model, seqs: list[Sequence]) -> torch.Tensor:
    """sum_i w_i * (summed CE of example i, alone in an unweighted batch) / sum_i w_i n_i, computed directly."""
    loss_fn = SupervisedLoss(model)
    total = sum(s.weight * loss_fn(*padded([s], pad_id=0)) for s in seqs)
    return total / sum(s.weight * s.n_supervised for s in seqs)


def test_sequence_weight_defaults_to_one_and_counts_in_the_denominator():
    s = Sequence((1, 2, 3), (-100, 2, 3))
    assert s.weight == 1.0 and s.supervised_weight == 2.0
    assert Sequence(s.ids, s.labels, weight=0.25).supervised_weight == 0.5


def test_padded_weights_align_with_labels():
    seqs = _weighted(synthetic_sequences(4))
    batch = padded_batch(seqs, pad_id=0)
    assert batch.weights.dtype == torch.float32 and batch.weights.shape == batch.labels.shape
    supervised = batch.labels != -100
    assert (batch.weights[~supervised] == 0).all()
    for i, s in enumerate(seqs):
        assert (batch.weights[i][supervised[i]] == s.weight).all()
    # all weights 1: no weights tensor, the very batch padded() gives (the loss's old summed path)
    plain = padded_batch(synthetic_sequences(4), pad_id=0)
    ids, labels = padded(synthetic_sequences(4), pad_id=0)
    assert plain.weights is None and torch.equal(plain.ids, ids) and torch.equal(plain.labels, labels)
    assert pack(synthetic_sequences(4), pad_id=0, max_len=64).weights is None


def test_weighted_loss_is_the_hand_computed_sum(tmp_path):
    model = live_model(base_cfg(tmp_path))
    seqs = _weighted(synthetic_sequences(5))
    with torch.no_grad():
        loss = SupervisedLoss(model)(*padded(seqs, 0), weights=padded_batch(seqs, 0).weights)
        # by hand: log-softmax of the full logits, each supervised token's CE times its example's weight
        expected = torch.zeros(())
        for s in seqs:
            ids, labels = padded([s], 0)
            logp = torch.log_softmax(model(ids).float(), dim=-1)[0, :-1]  # (T-1, V)
            for t, y in enumerate(labels[0, 1:].tolist()):
                if y != -100:
                    expected = expected - s.weight * logp[t, y]
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)


def test_all_ones_weights_reproduce_the_plain_sum(tmp_path):
    model = live_model(base_cfg(tmp_path))
    seqs = synthetic_sequences(5)
    ids, labels = padded(seqs, 0)
    ones = (labels != -100).float()
    with torch.no_grad():
        plain = SupervisedLoss(model)(ids, labels)
        weighted = SupervisedLoss(model)(ids, labels, weights=ones)
    torch.testing.assert_close(weighted, plain, rtol=1e-6, atol=1e-6)
    # weight-1 examples hash exactly as before weights existed, so older checkpoints still resume
    assert fingerprint(seqs) == fingerprint([Sequence(s.ids, s.labels) for s in seqs])
    assert fingerprint(_weighted(seqs)) != fingerprint([Sequence(s.ids, s.labels) for s in _weighted(seqs)])
    other = [Sequence(s.ids, s.labels, weight=0.5 if s.weight != 1.0 else 1.0) for s in _weighted(seqs)]
    assert fingerprint(other) != fingerprint(_weighted(seqs))  # another --aux_impact is another run


@pytest.mark.parametrize("share_prefix", [False, True])
def test_packed_weighted_loss_matches_padded(tmp_path, share_prefix):
    model = live_model(base_cfg(tmp_path))
    seqs = _weighted(synthetic_sequences(7))
    padded = padded_batch(seqs, pad_id=0)
    packed = pack(seqs, pad_id=0, max_len=80, share_prefix=share_prefix)
    assert packed.ids.shape[0] < len(seqs), "nothing was packed"
    assert packed.weights is not None and float(packed.weights.sum()) == pytest.approx(
        sum(s.supervised_weight for s in seqs))
    loss_a, grads_a = loss_and_grads(model, padded)
    loss_b, grads_b = loss_and_grads(model, packed)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-5)
    for name, g in grads_a.items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(grads_b[name], g, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("layout", [{}, {"packing": True}, {"packing": True, "share_prefix": True}])
def test_one_step_is_the_weighted_mean_update(tmp_path, layout):
    """One optimizer step over the whole data set (1 global batch in 3 micro-batches): its gradient is that of
    sum w CE / sum w computed directly, and the logged loss is that weighted mean."""
    seqs = _weighted(synthetic_sequences(6))
    cfg = base_cfg(tmp_path, micro_batch=2, grad_accum=3, max_steps=1, lr=1.0, adam_eps=ADAM_EPS, grad_clip=1e9,
                   max_len=80, **layout)
    rt, _, mcfg = tiny_setup(cfg)
    model = live_model(cfg)
    model.zero_grad(set_to_none=True)
    expected_loss = _weighted_mean_loss(model, seqs)
    expected_loss.backward()
    expected_loss = expected_loss.detach()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    before = _adapters(model)

    train_loop(cfg, rt, model, mcfg, seqs, pad_id=0)
    # Adam's first step is lr * g / (|g| + eps) (bias-corrected moments are g and g^2; no weight decay)
    lr = lr_at(0, cfg.optim, 1)
    for name, p in _adapters(model).items():
        g = grads[name]
        assert g.abs().max() > 0, name
        torch.testing.assert_close(before[name] - p, lr * g / (g.abs() + ADAM_EPS), rtol=1e-4, atol=1e-7,
                                   msg=name)
    [logged] = [r["loss"] for r in map(json.loads, open(tmp_path / "run" / "metrics.jsonl")) if "loss" in r]
    assert logged == pytest.approx(float(expected_loss), rel=1e-5)


def _write_corpus(path):
    """3 train dialogues of 3, 1 and 2 utterances: 6 ERC examples, 3 of which have a previous turn."""
    turns = [[("Ana", "The cake is ready!", "joy"), ("Bo", "It looks burnt.", "sadness"),
              ("Ana", "It is meant to be dark.", "anger")],
             [("Cy", "I failed the exam.", "sadness")],
             [("Bo", "Tea or coffee?", "neutral"), ("Cy", "Coffee, obviously!", "joy")]]
    with open(path, "w") as f:
        for i, d in enumerate(turns):
            f.write(json.dumps({"dialogue_id": f"d{i}", "split": "train", "utterances": [
                {"speaker": s, "text": t, "emotion": e} for s, t, e in d]}) + "\n")


def test_training_data_adds_weighted_impact_sequences(tmp_path, demo_tokenizer):
    corpus = tmp_path / "erc.jsonl"
    _write_corpus(corpus)
    tok = load_tokenizer(demo_tokenizer)
    spec = (f"jsonl={corpus}",)
    plain, fp_plain = training_data(DataConfig(train_data=spec, max_len=256), tok, seed=0)
    mixed, fp_mixed = training_data(DataConfig(train_data=spec, max_len=256, aux_impact=ALPHA), tok, seed=0)
    assert len(plain) == 6 and all(s.weight == 1.0 for s in plain)
    erc = [s for s in mixed if s.weight == 1.0]
    aux = [s for s in mixed if s.weight == ALPHA]
    assert len(erc) == 6 and len(aux) == 3 and len(mixed) == 9
    assert sorted(erc, key=lambda s: s.ids) == sorted(plain, key=lambda s: s.ids)
    for s in aux:
        text = tok.decode(list(s.ids))
        assert "Next speaker" in text and "Target" not in text
    assert fp_mixed["jsonl"]["examples"] == 9 and fp_mixed != fp_plain
    with pytest.raises(ValueError, match="context_turns 0"):
        training_data(DataConfig(train_data=spec, max_len=256, context_turns="0", aux_impact=ALPHA), tok, seed=0)
