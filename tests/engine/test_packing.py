"""Padding-free packing: the layout, and that packed micro-batches give the same loss, grads and training run."""
import pytest
import torch

from llama_erc.data import IGNORE_INDEX, Sequence
from llama_erc.engine.batching import Batch, padded_batch
from llama_erc.engine.config import TrainConfig, parse_config
from llama_erc.engine.loop import train_loop
from llama_erc.engine.batching import segment_mask
from llama_erc.engine.packing import first_fit_decreasing, pack, shared_prefix_length

from tests.engine.helpers import (ADAM_EPS, base_cfg, live_model, loss_and_grads, synthetic_sequences, tiny_setup)


def _sequences(n: int, seed: int = 0) -> list[Sequence]:
    """Synthetic ERC-like rows plus fully supervised ones, whose first label a packed row must not predict."""
    seqs = synthetic_sequences(n, seed=seed)
    return [Sequence(s.ids, s.ids) if i % 3 == 0 else s for i, s in enumerate(seqs)]


def test_first_fit_decreasing_is_deterministic_and_fits():
    assert first_fit_decreasing([5, 3, 7, 2, 4, 1], capacity=8) == [[2, 5], [0, 1], [4, 3]]
    assert first_fit_decreasing([4, 4, 4], capacity=4) == [[0], [1], [2]]  # ties in index order
    with pytest.raises(ValueError, match="longer than max_len 6"):
        first_fit_decreasing([3, 7], capacity=6)


def test_pack_layout():
    a = Sequence((11, 12, 13, 14), (IGNORE_INDEX, IGNORE_INDEX, 13, 14))
    b = Sequence((21, 22, 23), (21, 22, 23))  # first label must be dropped in a packed row
    c = Sequence((31, 32, 33, 34, 35, 36), (IGNORE_INDEX,) * 5 + (36,))
    batch = pack([a, b, c], pad_id=0, max_len=8)  # rows: [c], [a, b]
    assert batch.ids.tolist() == [[31, 32, 33, 34, 35, 36, 0], [11, 12, 13, 14, 21, 22, 23]]
    assert batch.positions.tolist() == [[0, 1, 2, 3, 4, 5, 0], [0, 1, 2, 3, 0, 1, 2]]
    x = IGNORE_INDEX
    assert batch.labels.tolist() == [[x, x, x, x, x, 36, x], [x, x, 13, 14, x, 22, 23]]
    m = batch.mask
    assert m.shape == (2, 7, 7) and m.dtype == torch.bool
    assert m[1, 4].tolist() == [False] * 4 + [True] + [False] * 2  # b's first token sees only itself
    assert m[1, 6].tolist() == [False] * 4 + [True] * 3
    assert m[1, 3].tolist() == [True] * 4 + [False] * 3
    assert m[0, 6].tolist() == [False] * 6 + [True]  # the pad sees only itself, real tokens never see it
    assert not m[0, :6, 6].any()
    n_sup = sum(s.n_supervised for s in (a, b, c))
    assert int((batch.labels[:, 1:] != IGNORE_INDEX).sum()) == n_sup


def test_segment_mask_pads_first_segment():
    seg = torch.tensor([[0, 0, 1, -1]])
    assert segment_mask(seg)[0].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]


def _assert_same_loss_and_grads(model, reference: Batch, batch: Batch) -> None:
    """fp32: the same summed loss and every adapter gradient (each non-zero) as the reference layout."""
    loss_a, grads_a = loss_and_grads(model, reference)
    loss_b, grads_b = loss_and_grads(model, batch)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-5)
    for name, g in grads_a.items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(grads_b[name], g, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("kernels", ["off", "on"])
def test_packed_loss_and_grads_match_unpacked(tmp_path, kernels):
    model = live_model(base_cfg(tmp_path, kernels=kernels))
    seqs = _sequences(7)

    padded = padded_batch(seqs, pad_id=0)
    packed = pack(seqs, pad_id=0, max_len=48)
    assert packed.ids.shape[0] < len(seqs), "nothing was packed"
    _assert_same_loss_and_grads(model, padded, packed)


def test_packed_training_matches_unpacked(tmp_path):
    """Same micro-batches, packed or padded: the same adapters after 3 steps (large Adam eps, see helpers)."""
    seqs = _sequences(24)
    kw = dict(micro_batch=4, grad_accum=2, max_steps=3, adam_eps=ADAM_EPS, lr=1.0, max_len=48)
    runs = {}
    for packing in (False, True):
        cfg = base_cfg(tmp_path / str(packing), packing=packing, **kw)
        rt, model, mcfg = tiny_setup(cfg)
        train_loop(cfg, rt, model, mcfg, seqs, pad_id=0)
        runs[packing] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for name, x in runs[False].items():
        torch.testing.assert_close(runs[True][name], x, rtol=1e-5, atol=1e-7, msg=name)
    assert any(x.abs().sum() > 0 for n, x in runs[True].items() if n.endswith("lora_b")), "adapters never moved"


def test_packing_flag():
    assert parse_config(TrainConfig, ["--packing"]).packing is True
    assert parse_config(TrainConfig, []).packing is False


# ---------------------------------------------------------------- flex_attention BlockMask twin

def test_flex_pack_has_same_layout_and_mask_rule():
    """pack(flex=True) carries segments instead of the mask, and the BlockMask's rule is segment_mask's."""
    from torch.nn.attention.flex_attention import create_mask

    seqs = _sequences(9, seed=3)
    sdpa, flex = pack(seqs, pad_id=0, max_len=40), pack(seqs, pad_id=0, max_len=40, flex=True)
    assert flex.mask is None and flex.segments.shape == flex.ids.shape
    for name in ("ids", "labels", "positions"):
        assert torch.equal(getattr(flex, name), getattr(sdpa, name)), name
    assert (flex.segments == -1).any(), "no padded tail: the pad rule is untested"
    bm = flex.attention_mask()
    B, T = flex.ids.shape
    dense = create_mask(bm.mask_mod, B, 1, T, T, device="cpu")[:, 0]  # (B, T, T) evaluated at every index pair
    assert torch.equal(dense, sdpa.mask)
    assert torch.equal(segment_mask(flex.segments), sdpa.mask)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # eager: the unfused reference
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flex_forward_matches_sdpa_mask(dtype):
    """Inference under the BlockMask (eager flex_attention on CPU) equals the bool-mask SDPA model, GQA included.
    bf16: flex's error against the fp32 model is within 2x SDPA's own bf16 error (tests/tolerances.assert_ratio)."""
    import copy

    from llama_erc.model.config import ModelConfig
    from llama_erc.model.llama import Transformer
    from tests.tolerances import assert_ratio

    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, hidden_dim=176, max_seq_len=64)
    model = Transformer(cfg).to(dtype).eval()
    model.init_weights(generator=torch.Generator().manual_seed(0))
    ref32 = copy.deepcopy(model).float()
    seqs = _sequences(9, seed=4)
    sdpa, flex = pack(seqs, pad_id=0, max_len=40), pack(seqs, pad_id=0, max_len=40, flex=True)
    with torch.no_grad():
        h_flex = model.hidden_states(flex.ids, flex.positions, flex.attention_mask())
        h_sdpa = model.hidden_states(sdpa.ids, sdpa.positions, sdpa.attention_mask())
        h_ref = ref32.hidden_states(sdpa.ids, sdpa.positions, sdpa.attention_mask())
    if dtype == torch.float32:
        torch.testing.assert_close(h_flex, h_sdpa, rtol=1e-5, atol=1e-5)
    else:
        assert_ratio(h_flex, h_ref, h_sdpa)


def test_flex_block_mask_shape_is_checked():
    from llama_erc.model.llama import Transformer
    from llama_erc.model.config import preset

    model = Transformer(preset("tiny"))
    flex = pack(_sequences(4), pad_id=0, max_len=40, flex=True)
    with pytest.raises(ValueError, match="BlockMask of batch"):
        model.hidden_states(flex.ids[:, :-1], flex.positions[:, :-1], flex.attention_mask())


def test_flex_flag_errors(tmp_path):
    with pytest.raises(ValueError, match="add --packing"):
        parse_config(TrainConfig, ["--packed_attention", "flex"])
    with pytest.raises(ValueError, match="packed_attention must be one of"):
        parse_config(TrainConfig, ["--packing", "--packed_attention", "xformers"])
    from llama_erc.engine.train import train

    cfg = base_cfg(tmp_path, packing=True, packed_attention="flex", train_data=("meld=/nonexistent",))
    with pytest.raises(ValueError, match="trains on CUDA only"):  # before the data or the model are touched
        train(cfg)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("checkpointing", ["none", "full", "selective", "block"])
@pytest.mark.parametrize("share", [False, True])
def test_flex_loss_and_grads_match_sdpa_cuda(tmp_path, dtype, checkpointing, share):
    """The training twin on CUDA: compiled flex_attention gives the bool-mask SDPA loss and adapter gradients."""
    model = live_model(base_cfg(tmp_path, device="cuda", dtype=dtype, kernels="on",
                                 activation_checkpointing=checkpointing))
    seqs = _with_prefix(_sequences(16, seed=5), prefix=tuple(range(40, 49)))

    loss_a, grads_a = loss_and_grads(model, pack(seqs, pad_id=0, max_len=64, share_prefix=share))
    loss_b, grads_b = loss_and_grads(model, pack(seqs, pad_id=0, max_len=64, flex=True, share_prefix=share))
    tol = (1e-4, 1e-5) if dtype == "fp32" else (2e-2, 2e-2)
    torch.testing.assert_close(loss_b, loss_a, rtol=tol[0], atol=tol[1])
    for name, g in grads_a.items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(grads_b[name], g, rtol=tol[0], atol=tol[1] * g.abs().max().item(), msg=name)


# ---------------------------------------------------------------- shared prompt prefix

def _with_prefix(seqs: list[Sequence], prefix: tuple[int, ...]) -> list[Sequence]:
    """The same examples behind a common instruction, as DialogueLLM prompts are."""
    return [Sequence(prefix + s.ids, (IGNORE_INDEX,) * len(prefix) + s.labels) for s in seqs]


def test_shared_prefix_length():
    x = IGNORE_INDEX
    a = Sequence((1, 2, 3, 4, 5, 6), (x, x, x, x, x, 6))
    b = Sequence((1, 2, 3, 4, 9, 9), (x, x, x, x, x, 9))
    assert shared_prefix_length([a, b]) == 4  # the common tokens
    c = Sequence((1, 2, 3, 7), (x, x, x, 7))
    assert shared_prefix_length([a, c]) == 2  # c's label 3 is predicted from position 2: c keeps it
    assert shared_prefix_length([a, Sequence((1, 2), (x, 2))]) == 0
    assert shared_prefix_length([a, a]) == 4  # identical rows still keep their supervised predecessor
    assert shared_prefix_length([Sequence((1, 2, 3), (x, x, x))] * 2) == 2  # and at least one token each


def test_pack_shared_prefix_layout():
    x = IGNORE_INDEX
    a = Sequence((1, 2, 3, 11, 12), (x, x, x, x, 12))
    b = Sequence((1, 2, 3, 21, 22, 23), (x, x, x, x, 22, 23))
    batch = pack([a, b], pad_id=0, max_len=9, share_prefix=True)  # prefix 3, then b (3) and a (2): one row
    assert batch.ids.tolist() == [[1, 2, 3, 21, 22, 23, 11, 12]]
    assert batch.positions.tolist() == [[0, 1, 2, 3, 4, 5, 3, 4]]
    assert batch.labels.tolist() == [[x, x, x, x, 22, 23, x, 12]]
    m = batch.mask[0].int().tolist()
    assert m[6] == [1, 1, 1, 0, 0, 0, 1, 0]  # a's first token: the prefix and itself, not b
    assert m[5] == [1, 1, 1, 1, 1, 1, 0, 0]
    assert m[2] == [1, 1, 1, 0, 0, 0, 0, 0]  # the prefix sees only the prefix
    n_sup = a.n_supervised + b.n_supervised
    assert int((batch.labels[:, 1:] != IGNORE_INDEX).sum()) == n_sup
    flex = pack([a, b], pad_id=0, max_len=9, share_prefix=True, flex=True)
    assert flex.segments.tolist() == [[-2, -2, -2, 0, 0, 0, 1, 1]]


def test_shared_prefix_loss_and_grads_match_unpacked(tmp_path):
    model = live_model(base_cfg(tmp_path))
    seqs = _with_prefix(_sequences(7), prefix=tuple(range(40, 52)))

    padded = padded_batch(seqs, pad_id=0)
    shared = pack(seqs, pad_id=0, max_len=64, share_prefix=True)
    P = shared_prefix_length(seqs)
    assert P == 11  # not 12: the fully supervised rows' first own label is predicted from the prefix's end
    assert shared.ids.shape[0] < len(seqs) and (shared.ids[:, :P] == torch.arange(40, 40 + P)).all()
    segments = pack(seqs, pad_id=0, max_len=64, share_prefix=True, flex=True).segments
    assert int((segments == -2).sum()) == P * shared.ids.shape[0], "the prefix is held once a row"
    _assert_same_loss_and_grads(model, padded, shared)


def test_shared_prefix_training_matches_unpacked(tmp_path):
    seqs = _with_prefix(_sequences(24), prefix=tuple(range(40, 50)))
    kw = dict(micro_batch=4, grad_accum=2, max_steps=3, adam_eps=ADAM_EPS, lr=1.0, max_len=64)
    runs = {}
    for share in (False, True):
        cfg = base_cfg(tmp_path / str(share), packing=share, share_prefix=share, **kw)
        rt, model, mcfg = tiny_setup(cfg)
        train_loop(cfg, rt, model, mcfg, seqs, pad_id=0)
        runs[share] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for name, x in runs[False].items():
        torch.testing.assert_close(runs[True][name], x, rtol=1e-5, atol=1e-7, msg=name)


def test_shared_prefix_flex_mask_rule():
    from torch.nn.attention.flex_attention import create_mask

    seqs = _with_prefix(_sequences(9, seed=6), prefix=(7, 8, 9, 10, 11))
    sdpa = pack(seqs, pad_id=0, max_len=48, share_prefix=True)
    flex = pack(seqs, pad_id=0, max_len=48, share_prefix=True, flex=True)
    assert (flex.segments == -2).any() and (flex.segments == -1).any()
    B, T = flex.ids.shape
    dense = create_mask(flex.attention_mask().mask_mod, B, 1, T, T, device="cpu")[:, 0]
    assert torch.equal(dense, sdpa.mask)


def test_share_prefix_flag():
    assert parse_config(TrainConfig, ["--packing", "--share_prefix"]).share_prefix is True
    with pytest.raises(ValueError, match="add --packing"):
        parse_config(TrainConfig, ["--share_prefix"])
