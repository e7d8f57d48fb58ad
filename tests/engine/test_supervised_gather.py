"""The loss's fixed-length supervised gather (engine/batching.py: supervised_slots; engine/loss.py): the same
loss and gradients, bit for bit, as the boolean gather it replaces, with no data-dependent op on the way."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from llama_erc.data import IGNORE_INDEX, Sequence
from llama_erc.engine.batching import padded_batch, supervised_slots
from llama_erc.engine.loss import SupervisedLoss
from llama_erc.engine.packing import pack

from tests.engine.helpers import base_cfg, live_model, synthetic_sequences

X = IGNORE_INDEX


def test_supervised_slots_layout():
    labels = torch.tensor([[X, X, 7, 8], [X, 9, X, X]])
    weights = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.0, 1.0, 0.0, 0.0]])
    index, targets, w = supervised_slots(labels, weights, n_slots=5)
    # row-major, as the boolean gather: (0, 1) predicts 7, (0, 2) predicts 8, (1, 0) predicts 9; flat = b * T + t
    assert index.tolist() == [1, 2, 4, 0, 0]
    assert targets.tolist() == [7, 8, 9, X, X]
    assert w.tolist() == [0.5, 0.5, 1.0, 0.0, 0.0]
    index, targets, w = supervised_slots(labels, None)  # default n_slots: the supervised count
    assert index.tolist() == [1, 2, 4] and targets.tolist() == [7, 8, 9] and w is None
    with pytest.raises(ValueError, match="3 supervised positions do not fit n_slots=2"):
        supervised_slots(labels, None, n_slots=2)


def _batches(weighted: bool):
    seqs = synthetic_sequences(7)
    if weighted:
        seqs = [Sequence(s.ids, s.labels, weight=0.3 if i % 2 else 1.0) for i, s in enumerate(seqs)]
    prefixed = [Sequence(tuple(range(40, 46)) + s.ids, (X,) * 6 + s.labels, weight=s.weight) for s in seqs]
    return {"padded": padded_batch(seqs, 0), "packed": pack(seqs, 0, max_len=64),
            "prefix": pack(prefixed, 0, max_len=80, share_prefix=True)}


def _loss_and_grads(model, *args):
    model.zero_grad(set_to_none=True)
    loss = SupervisedLoss(model)(*args)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("weighted", [False, True])
def test_gather_is_bitwise_the_boolean_path(tmp_path, dtype, weighted):
    """Padding slots add exact zeros (ignored targets, weight 0) after the real terms, and index_select's
    backward scatters the same values the boolean gather's does: measured bitwise equal on CPU, fp32 and bf16,
    for 0 to 300 padding slots, so the check is torch.equal."""
    model = live_model(base_cfg(tmp_path, dtype=dtype))
    for name, b in _batches(weighted).items():
        ref_loss, ref_grads = _loss_and_grads(model, b.ids, b.labels, b.positions, b.attention_mask(), b.weights)
        assert ref_loss > 0
        for extra in (0, 13):
            index, targets, w = supervised_slots(b.labels, b.weights, b.index.numel() + extra)
            assert (w is None) == (not weighted)
            loss, grads = _loss_and_grads(model, b.ids, targets, b.positions, b.attention_mask(), w, index)
            assert torch.equal(loss, ref_loss), (name, extra, float(loss - ref_loss))
            for g, ref in zip(grads, ref_grads):
                assert torch.equal(g, ref), (name, extra, float((g - ref).abs().max()))
        # the batch's own slots (what train_step passes) are the unpadded ones
        assert torch.equal(_loss_and_grads(model, *b.loss_inputs())[0], ref_loss)


def test_unweighted_gather_is_the_plain_sum(tmp_path):
    """No weights: the plain summed CE, not a sum of CE * 1 (the path unweighted runs took before)."""
    model = live_model(base_cfg(tmp_path))
    b = _batches(weighted=False)["packed"]
    assert b.slot_weights is None and b.weights is None
    ones = torch.ones(b.index.numel())
    with torch.no_grad():
        plain = SupervisedLoss(model)(*b.loss_inputs())
        times_one = SupervisedLoss(model)(b.ids, b.targets, b.positions, b.attention_mask(), ones, b.index)
    torch.testing.assert_close(times_one, plain, rtol=1e-6, atol=1e-6)


class _DataDependentOps(TorchDispatchMode):
    """Records the ops whose output shape depends on tensor values, or that read a value back to the host: on
    CUDA each is a device sync, and none can be captured in a CUDA graph. Boolean indexing (aten.index with a
    bool index) runs nonzero below the dispatcher, so it is recognised by its arguments."""
    NAMES = ("nonzero", "masked_select", "_local_scalar_dense", "item")

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat = [a for arg in args for a in (arg if isinstance(arg, (list, tuple)) else [arg])]
        bool_index = "index" in str(func) and any(isinstance(a, torch.Tensor) and a.dtype == torch.bool
                                                  for a in flat[1:])
        if bool_index or any(n in str(func) for n in self.NAMES):
            self.found.append(str(func))
        return func(*args, **(kwargs or {}))


def test_gather_path_has_no_data_dependent_op(tmp_path):
    model = live_model(base_cfg(tmp_path))
    b = _batches(weighted=True)["packed"]
    with _DataDependentOps() as ops:
        SupervisedLoss(model)(*b.loss_inputs()).backward()
    assert ops.found == []
    with _DataDependentOps() as ops:  # the check can fail: the boolean path is caught
        SupervisedLoss(model)(b.ids, b.labels, b.positions, b.attention_mask(), b.weights).backward()
    assert "aten.index.Tensor" in ops.found


@pytest.mark.gpu
@pytest.mark.parametrize("kernels", ["off", "on"])
def test_gather_step_has_no_device_sync_cuda(tmp_path, kernels):
    """On CUDA (not run without one): the loss's forward and backward through the fixed-length gather never make
    the host wait on the device (torch.cuda.set_sync_debug_mode raises on a synchronizing op); the boolean
    gather does."""
    model = live_model(base_cfg(tmp_path, device="cuda", kernels=kernels))
    b = _batches(weighted=True)["packed"].to(torch.device("cuda"))
    inputs = b.loss_inputs()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        SupervisedLoss(model)(*inputs).backward()
        with pytest.raises(RuntimeError, match="synchroniz"):
            SupervisedLoss(model)(b.ids, b.labels, b.positions, b.mask, b.weights)
    finally:
        torch.cuda.set_sync_debug_mode("default")
