"""q and k rotated in one launch (apply_rope_qk, and apply_rope_qk_ in place) vs the twins: forward and the
gradients of q's and k's sources, fp32 and bf16, GQA, one row, odd sizes, per-row tables, the model's views and
other layouts; the in-place semantics (storage, versions, autograd errors); one launch each way; the refusal
under a dispatch mode (selective checkpointing)."""
import importlib

import pytest
import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

import llama_erc.kernels as K
from llama_erc.kernels import REFERENCE as REF
from tests.kernels.helpers import check_against_reference, randn
from tests.tolerances import TOL, assert_close

rope_module = importlib.import_module("llama_erc.kernels.rope")
DTYPES = [torch.float32, torch.bfloat16]
OPS = {"in-place": (K.apply_rope_qk_, REF.apply_rope_qk_), "out-of-place": (K.apply_rope_qk, REF.apply_rope_qk)}


def _tables(B, T, Dh, device, per_row, seed=0):
    g = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, 4096, (B, T) if per_row else (T,), generator=g).to(device)
    return REF.rope_cos_sin(pos, Dh)  # (T | B T, Dh/2) fp32


def _layout(src, layout, heads, Dh):
    """src (a leaf) -> the (B, T, heads, Dh) tensor the op gets, through one graph op first (x * 1 is exact), so
    the op sees a non-leaf as in the model; the leaf receives the gradient of the op's input."""
    x = src * 1
    if layout == "projection-view":  # the model: wq(x).view(B, T, H, Dh), a whole contiguous view
        return x.unflatten(-1, (heads, Dh))
    if layout == "fused-slice":  # q out of a fused qkv projection: (B, T, 3 H Dh)[..., :H Dh], a partial view
        return x[..., : heads * Dh].unflatten(-1, (heads, Dh))
    if layout == "heads-first":  # (B, H, T, Dh) transposed: a non-contiguous view
        return x.transpose(1, 2)
    if layout == "strided-tensor":  # non-contiguous and no view: x * 1 keeps a transposed leaf's strides
        return x
    return x  # "contiguous"


def _sources(shape, heads, layout, dtype, device, seed):
    B, T, _, Dh = shape
    if layout == "projection-view":
        src = randn((B, T, heads * Dh), dtype, device, seed)
    elif layout == "fused-slice":
        src = randn((B, T, 3 * heads * Dh), dtype, device, seed)
    elif layout == "heads-first":
        src = randn((B, heads, T, Dh), dtype, device, seed)
    elif layout == "strided-tensor":
        src = randn((B, heads, T, Dh), dtype, device, seed).transpose(1, 2)  # a leaf view keeps its strides
    else:
        src = randn((B, T, heads, Dh), dtype, device, seed)
    return src.requires_grad_()


def _check(op_pair, shape, n_kv, layout, dtype, device, per_row=False, seed=0):
    """Both outputs through one flat tensor, so check_against_reference compares values and both sources' grads."""
    B, T, H, Dh = shape
    q_src = _sources(shape, H, layout, dtype, device, seed)
    k_src = _sources(shape, n_kv, layout, dtype, device, seed + 1)
    cos, sin = _tables(B, T, Dh, device, per_row, seed)

    def wrap(op):
        def fn(qs, ks, c, s):
            q, k = _layout(qs, layout, H, Dh), _layout(ks, layout, n_kv, Dh)
            assert layout == "contiguous" or layout == "projection-view" or not q.is_contiguous()
            qo, ko = op(q, k, c, s)
            return torch.cat([qo.reshape(-1), ko.reshape(-1)])
        return fn

    kernel, reference = op_pair
    dy = randn((B * T * (H + n_kv) * Dh,), dtype, device, seed + 2)
    check_against_reference(wrap(kernel), wrap(reference), (q_src, k_src, cos, sin), dy, "elementwise",
                            ["elementwise", "elementwise", None, None])


@pytest.mark.parametrize("shape,n_kv", [((1, 1, 1, 2), 1), ((2, 5, 3, 6), 3), ((2, 7, 8, 16), 2),
                                        ((1, 3, 5, 24), 1), ((2, 16, 4, 32), 4)],
                         ids=["one-row-one-pair", "odd-H-odd-pairs", "GQA-8-2", "GQA-5-1-Dh24", "2x16x4x32"])
@pytest.mark.parametrize("per_row", [False, True], ids=["shared-pos", "per-row-pos"])
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_rope_qk_matches_reference(shape, n_kv, per_row, op, dtype, device):
    _check(OPS[op], shape, n_kv, "projection-view", dtype, device, per_row)


@pytest.mark.parametrize("layout", ["contiguous", "projection-view", "fused-slice", "heads-first", "strided-tensor"])
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_rope_qk_layouts(layout, op, dtype, device):
    _check(OPS[op], (2, 5, 4, 8), 2, layout, dtype, device, per_row=True, seed=3)


def test_rope_qk_equals_apply_rope_bitwise(device):
    # one launch for both computes exactly what apply_rope computes for each (same tile math and rounding)
    for dtype in DTYPES:
        q, k = randn((2, 7, 8, 16), dtype, device, 1), randn((2, 7, 2, 16), dtype, device, 2)
        cos, sin = _tables(2, 7, 16, device, per_row=True)
        qo, ko = K.apply_rope_qk(q, k, cos, sin)
        assert torch.equal(qo, K.apply_rope(q, cos, sin)) and torch.equal(ko, K.apply_rope(k, cos, sin))
        dq, dk = rope_module.rope_qk_bwd(q, k, cos, sin)
        assert torch.equal(dq, rope_module.rope_bwd(q, cos, sin)) and torch.equal(dk, rope_module.rope_bwd(k, cos, sin))
        q_in, k_in = q.clone(), k.clone()
        assert K.apply_rope_qk_(q_in, k_in, cos, sin)[0] is q_in
        assert torch.equal(q_in, qo) and torch.equal(k_in, ko)


@pytest.mark.parametrize("op", [K.apply_rope_qk_, REF.apply_rope_qk_], ids=["kernel", "twin"])
def test_rope_qk_in_place_semantics(op, device):
    # the in-place op and its twin return q and k themselves, their storage holds the rotation, and their versions moved
    B, T, H, Hkv, Dh = 2, 5, 4, 2, 8
    w_q = randn((16, H * Dh), torch.float32, device, 1).requires_grad_()
    w_k = randn((16, Hkv * Dh), torch.float32, device, 2).requires_grad_()
    x = randn((B, T, 16), torch.float32, device, 3)
    cos, sin = _tables(B, T, Dh, device, per_row=False)
    q, k = (x @ w_q).view(B, T, H, Dh), (x @ w_k).view(B, T, Hkv, Dh)
    expected = REF.apply_rope_qk(q, k, cos, sin)
    ptrs, versions = (q.data_ptr(), k.data_ptr()), (q._version, k._version)
    qo, ko = op(q, k, cos, sin)
    assert qo is q and ko is k and (q.data_ptr(), k.data_ptr()) == ptrs
    assert q._version > versions[0] and k._version > versions[1]
    assert_close(q, expected[0], TOL["elementwise"][torch.float32])
    assert_close(k, expected[1], TOL["elementwise"][torch.float32])
    assert q.grad_fn is not None and k.grad_fn is not None  # the views now record the rotation


def test_rope_qk_out_of_place_leaves_inputs(device):
    q, k = randn((2, 3, 4, 8), torch.float32, device, 1), randn((2, 3, 2, 8), torch.float32, device, 2)
    q0, k0 = q.clone(), k.clone()
    cos, sin = _tables(2, 3, 8, device, per_row=False)
    qo, ko = K.apply_rope_qk(q, k, cos, sin)
    assert torch.equal(q, q0) and torch.equal(k, k0) and qo.data_ptr() != q.data_ptr()


class _Counter:
    """Wraps a launcher (each call is one kernel launch) and counts the calls."""

    def __init__(self, fn):
        self.fn, self.n = fn, 0

    def __call__(self, *args, **kwargs):
        self.n += 1
        return self.fn(*args, **kwargs)


@pytest.mark.parametrize("layout", ["projection-view", "fused-slice", "heads-first"])
def test_rope_qk_launches(layout, device, monkeypatch):
    # one qk launch forward and one backward, whichever of q and k are written in place
    qk, single = _Counter(rope_module._rope_qk), _Counter(rope_module._rope)
    monkeypatch.setattr(rope_module, "_rope_qk", qk)
    monkeypatch.setattr(rope_module, "_rope", single)
    B, T, H, Dh = 2, 3, 4, 8
    q_src = _sources((B, T, H, Dh), H, layout, torch.float32, device, 0)
    k_src = _sources((B, T, H, Dh), 2, layout, torch.float32, device, 1)
    cos, sin = _tables(B, T, Dh, device, per_row=False)
    qo, ko = K.apply_rope_qk_(_layout(q_src, layout, H, Dh), _layout(k_src, layout, 2, Dh), cos, sin)
    assert (qk.n, single.n) == (1, 0)
    (qo.sum() + 2 * ko.sum()).backward()
    assert (qk.n, single.n) == (2, 0)


@pytest.mark.parametrize("op", [K.apply_rope_qk_, REF.apply_rope_qk_], ids=["kernel", "twin"])
def test_rope_qk_in_place_where_autograd_allows(op, device):
    # whole views of a projection (wk: DEFAULT views) are written in place; a view made inside a custom Function
    # (the fused LoRA linear's output, as for wq) or a slice of one tensor get a fresh tensor, returned instead
    B, T, H, Dh = 2, 3, 4, 8
    x = randn((B, T, 16), torch.float32, device, 0)
    w = randn((H * Dh, 16), torch.float32, device, 1)
    lora_a = randn((2, 16), torch.float32, device, 2).requires_grad_()
    lora_b = randn((H * Dh, 2), torch.float32, device, 3).requires_grad_()
    w_k = randn((16, 2 * Dh), torch.float32, device, 4).requires_grad_()
    cos, sin = _tables(B, T, Dh, device, per_row=True)
    grads = {}
    for name, fn in (("op", op), ("twin", REF.apply_rope_qk)):
        q = K.lora_linear(x, w, lora_a, lora_b, 2.0, 0.0, True).view(B, T, H, Dh)  # a custom Function's view
        k = (x @ w_k).view(B, T, 2, Dh)
        qo, ko = fn(q, k, cos, sin)
        if name == "op":
            assert qo is not q and ko is k  # q rotated into a fresh tensor, k in place
            assert not torch.equal(q, qo)
        grads[name] = torch.autograd.grad((qo * qo.detach()).sum() + (ko * ko.detach()).sum(),
                                          (lora_a, lora_b, w_k))
        grads[name + " values"] = (qo.detach(), ko.detach())
    for a, b in zip(grads["op"] + grads["op values"], grads["twin"] + grads["twin values"]):
        assert_close(a, b, TOL["elementwise"][torch.float32])


def test_rope_qk_backward_leaves_shared_gradients_alone(device):
    # an add hands one gradient tensor to both its inputs: the rotation's backward must not write into it, or
    # the other input (here a leaf, whose .grad may be that very tensor) would receive a rotated gradient
    B, T, H, Dh = 1, 3, 2, 8
    q_src = randn((B, T, H * Dh), torch.float32, device, 0).requires_grad_()
    k_src = randn((B, T, H * Dh), torch.float32, device, 1).requires_grad_()
    other = randn((B, T, H, Dh), torch.float32, device, 2).requires_grad_()
    cos, sin = _tables(B, T, Dh, device, per_row=False)
    qo, ko = K.apply_rope_qk_((q_src * 1).view(B, T, H, Dh), (k_src * 1).view(B, T, H, Dh), cos, sin)
    dy = randn((B, T, H, Dh), torch.float32, device, 3)
    ((qo + other) * 1).backward(dy)
    assert torch.equal(other.grad, dy)
    assert_close(q_src.grad.view(B, T, H, Dh), rope_module.rope_bwd(dy, cos, sin), TOL["elementwise"][torch.float32])


def test_rope_qk_in_place_autograd_errors(device):
    B, T, H, Dh = 1, 3, 2, 8
    cos, sin = _tables(B, T, Dh, device, per_row=False)
    src = randn((B, T, H * Dh), torch.float32, device, 0).requires_grad_()
    # a graph that saved q before the rotation fails its version check instead of using rotated values
    q, k = (src * 1).view(B, T, H, Dh), (src * 2).view(B, T, H, Dh)
    k_sin = k.sin()  # SinBackward saves its input, k
    K.apply_rope_qk_(q, k, cos, sin)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        k_sin.sum().backward()
    # leaves that require grad (or views of them) are refused before anything is written
    leaf_q = randn((B, T, H, Dh), torch.float32, device, 1).requires_grad_()
    leaf_k = randn((B, T, H, Dh), torch.float32, device, 2).requires_grad_()
    before = leaf_q.detach().clone()
    with pytest.raises(ValueError, match="q is \\(a view of\\) a leaf that requires grad"):
        K.apply_rope_qk_(leaf_q, leaf_k.detach().clone(), cos, sin)
    with pytest.raises(ValueError, match="k is \\(a view of\\) a leaf"):
        K.apply_rope_qk_(leaf_q.detach().clone(), leaf_k.view(B, T, H, Dh), cos, sin)
    assert torch.equal(leaf_q.detach(), before)


def test_rope_qk_untracked_views(device):
    # under no_grad views of any layout are rotated in place, with no node
    cos, sin = _tables(2, 5, 8, device, per_row=True)
    base = randn((2, 4, 5, 8), torch.float32, device, 0)
    q = base.transpose(1, 2)  # (B, T, H, Dh) view
    k = randn((2, 5, 1, 8), torch.float32, device, 1)
    expected = REF.apply_rope_qk(q, k, cos, sin)
    with torch.no_grad():
        K.apply_rope_qk_(q, k, cos, sin)
    assert torch.equal(q, expected[0]) and torch.equal(k, expected[1]) and q.grad_fn is None


def _keep_everything(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE


@pytest.mark.parametrize("impl", ["kernel", "twin"])
def test_rope_qk_in_place_refused_under_selective_checkpointing(impl, device):
    # selective checkpointing's dispatch mode caches op outputs (q, k): the in-place op refuses, the
    # out-of-place one runs
    fn_, fn = (K.apply_rope_qk_, K.apply_rope_qk) if impl == "kernel" else (REF.apply_rope_qk_, REF.apply_rope_qk)
    q, k = randn((1, 3, 2, 8), torch.float32, device, 0), randn((1, 3, 1, 8), torch.float32, device, 1)
    cos, sin = _tables(1, 3, 8, device, per_row=False)
    caching, _ = create_selective_checkpoint_contexts(_keep_everything)
    assert K.in_place_safe()
    with caching:
        assert not K.in_place_safe()
        with pytest.raises(RuntimeError, match="refused under an active torch dispatch mode.*apply_rope_qk"):
            fn_(q, k, cos, sin)
        fn(q, k, cos, sin)


def test_rope_qk_validation(device):
    cos, sin = _tables(2, 5, 8, device, per_row=False)
    q, k = torch.randn(2, 5, 4, 8, device=device), torch.randn(2, 5, 2, 8, device=device)
    with pytest.raises(ValueError, match=r"q torch.float32 \(2, 5, 4, 8\) and k torch.float32 \(1, 5, 2, 8\)"):
        K.apply_rope_qk(q, k[:1], cos, sin)  # (T, Dh/2) tables fit both; the batch sizes differ
    with pytest.raises(ValueError, match="must share B, T, Dh and the dtype"):
        K.apply_rope_qk(q, k.bfloat16(), cos, sin)
    with pytest.raises(ValueError, match=r"k \(2, 5, 16\) must be \(B, T, H, Dh\)"):
        K.apply_rope_qk(q, k.flatten(2), cos, sin)
    with pytest.raises(ValueError, match=r"cos \(4, 4\).*\(5, 4\)"):
        K.apply_rope_qk(q, k, cos[:4], sin[:4])
    with pytest.raises(ValueError, match="does not differentiate cos/sin"):
        K.apply_rope_qk_(q, k, cos.clone().requires_grad_(), sin)
    with pytest.raises(ValueError, match="one device"):
        K.apply_rope_qk(q, k.to("meta"), cos, sin)
    with pytest.raises(ValueError, match=r"k \(2, 5, 2, 8\) with strides \(0, 0, 0, 1\) has elements that share"):
        K.apply_rope_qk_(q, torch.randn(8, device=device).expand(2, 5, 2, 8), cos, sin)
    qkv = torch.randn(2, 5, 8 * 8, device=device)
    with pytest.raises(ValueError, match="q and k share one storage"):  # without a graph: views written in place
        K.apply_rope_qk_(qkv[..., :32].unflatten(-1, (4, 8)), qkv[..., 32:48].unflatten(-1, (2, 8)), cos, sin)
    same = (torch.randn(2, 5, 4, 8, device=device, requires_grad=True) * 1)
    with pytest.raises(ValueError, match="q and k are one tensor"):
        K.apply_rope_qk_(same, same, cos, sin)
    with pytest.raises(ValueError, match="q must be a torch.Tensor, got list"):
        K.apply_rope_qk_([1.0], k, cos, sin)


@pytest.mark.gpu
@pytest.mark.parametrize("n_kv", [32, 8], ids=["7B", "GQA-8"])
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_rope_qk_training_shape(n_kv, op, dtype, device):
    _check(OPS[op], (8, 512, 32, 128), n_kv, "projection-view", dtype, device)
