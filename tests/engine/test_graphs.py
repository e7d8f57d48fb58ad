"""--cuda_graphs: fixed-shape packed batches (engine/packing.py) give the eager packed step's losses and adapters
on CPU; on CUDA (gpu-marked, not run without one) the captured step (engine/graphs.py) gives the eager step's."""
import json

import pytest
import torch

from llama_erc.data import IGNORE_INDEX, Sequence
from llama_erc.engine.config import TrainConfig, parse_config
from llama_erc.engine.graphs import StepGraphs
from llama_erc.engine.loop import train_loop
from llama_erc.engine.loss import SupervisedLoss
from llama_erc.engine.optim import OptimConfig, make_optimizer, trainable_parameters
from llama_erc.engine.packing import MIN_SLOTS, BatchLayout, bucket_rows, bucket_slots, pack
from llama_erc.engine.step import train_step

from tests.engine.helpers import ADAM_EPS, base_cfg, live_model, loss_and_grads, synthetic_sequences, tiny_setup


def _sequences(n: int, seed: int = 0, weighted: bool = False) -> list[Sequence]:
    """Synthetic ERC-like rows sharing a 6-token prompt prefix; every third an auxiliary one when weighted."""
    prefix = tuple(range(40, 46))
    return [Sequence(prefix + s.ids, (IGNORE_INDEX,) * len(prefix) + s.labels,
                     weight=0.3 if weighted and i % 3 == 0 else 1.0)
            for i, s in enumerate(synthetic_sequences(n, seed=seed))]


def test_buckets():
    assert [bucket_rows(n) for n in (1, 2, 3, 4, 5, 8, 9)] == [1, 2, 4, 4, 8, 8, 16]
    assert [bucket_slots(n) for n in (0, 1, MIN_SLOTS, MIN_SLOTS + 1)] == [MIN_SLOTS, MIN_SLOTS, MIN_SLOTS,
                                                                           2 * MIN_SLOTS]


def test_fixed_shape_pack_layout():
    seqs = _sequences(4)
    plain = pack(seqs, pad_id=0, max_len=36)
    fixed = pack(seqs, pad_id=0, max_len=36, fixed_shape=True)
    n_rows, T = plain.ids.shape
    assert (n_rows, T) == (3, 35) and fixed.ids.shape == (4, 36)  # 3 rows -> a bucket of 4, each max_len long
    # the packed rows are the same, followed by padding
    assert torch.equal(fixed.ids[:n_rows, :T], plain.ids) and (fixed.ids[:n_rows, T:] == 0).all()
    assert torch.equal(fixed.labels[:n_rows, :T], plain.labels) and (fixed.labels[:, T:] == IGNORE_INDEX).all()
    assert (fixed.ids[n_rows:] == 0).all() and (fixed.labels[n_rows:] == IGNORE_INDEX).all()
    assert torch.equal(fixed.mask[n_rows], torch.eye(36, dtype=torch.bool))  # a padding row sees only itself
    assert torch.equal(fixed.mask[:n_rows, :T, :T], plain.mask)
    # the gather: the same supervised positions (re-based to the wider rows), then ignored slots of weight 0
    n_sup = sum(s.n_supervised for s in seqs)
    assert fixed.index.shape == (bucket_slots(n_sup),) and plain.index.shape == (n_sup,)
    rows, cols = plain.index // T, plain.index % T
    assert torch.equal(fixed.index[:n_sup], rows * 36 + cols)
    assert torch.equal(fixed.targets[:n_sup], plain.targets) and (fixed.targets[n_sup:] == IGNORE_INDEX).all()
    assert fixed.n_tokens == plain.n_tokens
    weighted = pack(_sequences(4, weighted=True), pad_id=0, max_len=36, fixed_shape=True)
    assert weighted.slot_weights.shape == weighted.index.shape and (weighted.slot_weights[n_sup:] == 0).all()


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("share_prefix", [False, True])
def test_fixed_shape_loss_and_grads_match_packed(tmp_path, weighted, share_prefix):
    """fp32: the padding rows, columns and slots change no loss term; gradients agree up to summation order
    over the extra (zero-gradient) positions, the tolerance of the packing tests."""
    model = live_model(base_cfg(tmp_path))
    seqs = _sequences(7, weighted=weighted)
    loss_a, grads_a = loss_and_grads(model, pack(seqs, 0, max_len=64, share_prefix=share_prefix))
    loss_b, grads_b = loss_and_grads(model, pack(seqs, 0, max_len=64, share_prefix=share_prefix, fixed_shape=True))
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-5)
    for name, g in grads_a.items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(grads_b[name], g, rtol=1e-5, atol=1e-6, msg=name)


def _losses(out_dir) -> list[float]:
    lines = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if "loss" in r]


def test_cuda_graphs_training_matches_packed_on_cpu(tmp_path):
    """On a CPU --cuda_graphs runs the fixed-shape batches eagerly: the packed run's per-step losses and its
    adapters after 3 AdamW steps (large Adam eps, see helpers), aux weights and a shared prefix included."""
    seqs = _sequences(24, weighted=True)
    kw = dict(micro_batch=4, grad_accum=2, max_steps=3, adam_eps=ADAM_EPS, lr=1.0, max_len=48, packing=True,
              share_prefix=True)
    runs, losses = {}, {}
    for graphs in (False, True):
        cfg = base_cfg(tmp_path / str(graphs), cuda_graphs=graphs, **kw)
        assert cfg.layout.fixed_shapes is graphs
        rt, model, mcfg = tiny_setup(cfg)
        train_loop(cfg, rt, model, mcfg, seqs, pad_id=0)
        runs[graphs] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        losses[graphs] = _losses(tmp_path / str(graphs) / "run")
    assert len(losses[True]) == 3
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=1e-6, atol=1e-6)
    for name, x in runs[False].items():
        torch.testing.assert_close(runs[True][name], x, rtol=1e-5, atol=1e-7, msg=name)
    assert any(x.abs().sum() > 0 for n, x in runs[True].items() if n.endswith("lora_b")), "adapters never moved"


def test_cuda_graphs_flag_errors(tmp_path):
    assert parse_config(TrainConfig, ["--packing", "--cuda_graphs"]).layout.fixed_shapes is True
    assert parse_config(TrainConfig, ["--packing"]).layout.fixed_shapes is False
    with pytest.raises(ValueError, match="--cuda_graphs packs micro-batches into fixed shapes: add --packing"):
        parse_config(TrainConfig, ["--cuda_graphs"])
    with pytest.raises(ValueError, match="--cuda_graphs takes --packed_attention sdpa, got 'flex'"):
        parse_config(TrainConfig, ["--packing", "--cuda_graphs", "--packed_attention", "flex"])
    with pytest.raises(ValueError, match="fixed shapes"):
        BatchLayout(fixed_shapes=True)
    with pytest.raises(ValueError, match="not flex attention"):
        BatchLayout(packing=True, fixed_shapes=True, flex=True)
    model = live_model(base_cfg(tmp_path))
    with pytest.raises(ValueError, match=r"one CUDA device, got \['cpu'\]"):
        StepGraphs(SupervisedLoss(model), trainable_parameters(model))


def test_cuda_graphs_refuses_several_processes(tmp_path, monkeypatch):
    """train.py refuses --cuda_graphs under torchrun with several processes, before the data or model load."""
    from llama_erc.engine import train as train_module
    from llama_erc.engine.runtime import Runtime

    two = Runtime(rank=0, local_rank=0, world_size=2, device=torch.device("cpu"), dtype=torch.float32,
                  use_kernels=False)
    monkeypatch.setattr(train_module, "setup_runtime", lambda *a: two)
    monkeypatch.setattr(train_module, "teardown_runtime", lambda: None)
    cfg = base_cfg(tmp_path, packing=True, cuda_graphs=True, train_data=("meld=/nonexistent",))
    with pytest.raises(ValueError, match="--cuda_graphs captures one process's step, got 2 processes"):
        train_module.train(cfg)


# ---------------------------------------------------------------- CUDA only: not run without a GPU

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("checkpointing", ["none", "full"])
@pytest.mark.parametrize("kernels", ["off", "on"])
def test_captured_step_matches_eager_cuda(tmp_path, dtype, checkpointing, kernels):
    """The captured step (engine/graphs.py) against the eager one on the same fixed-shape batches: per-step
    losses and the adapters after 4 steps whose micro-batches fall in several shapes, a new shape first seen
    mid-step (captured while the step's gradients accumulate), aux weights on some micro-batches only."""
    seqs = _sequences(40, seed=2, weighted=True)
    # micro-batches of 2..6 examples: rows and gather lengths of several buckets; steps of 2 micro-batches
    sizes = [2, 6, 3, 5, 2, 4, 6, 2]
    micro, start = [], 0
    for n in sizes:
        micro.append(seqs[start:start + n])
        start += n
    steps = [micro[i:i + 2] for i in range(0, len(micro), 2)]
    layout = BatchLayout(packing=True, max_len=64, share_prefix=True, fixed_shapes=True)
    cfg = base_cfg(tmp_path, device="cuda", dtype=dtype, kernels=kernels, activation_checkpointing=checkpointing)
    results = {}
    for captured in (False, True):
        model = live_model(cfg)
        loss_fn = SupervisedLoss(model)
        params = trainable_parameters(model)
        opt = make_optimizer(params, OptimConfig(lr=1.0, adam_eps=ADAM_EPS))
        graphs = StepGraphs(loss_fn, params) if captured else None
        losses = [train_step(loss_fn, opt, params, mbs, layout=layout, pad_id=0, grad_clip=1.0,
                             weight_sum=sum(s.supervised_weight for mb in mbs for s in mb),
                             device=torch.device("cuda"), graphs=graphs).loss for mbs in steps]
        results[captured] = losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        if captured:
            assert len(graphs.graphs) >= 3, "the batches should fall in several shapes"
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == "fp32" else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(torch.tensor(results[True][0]), torch.tensor(results[False][0]), **tol)
    for name, x in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], x, **tol, msg=name)
