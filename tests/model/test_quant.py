"""A frozen quantized base (model/quant.py): a GGUF file's own blocks computes bit for bit what its dequantized-
at-load model computes (logits, LoRA losses and gradients step by step, fp32 and bf16, eager and fused LoRA, with
and without activation checkpointing); no weight-sized tensor is saved for backward; nf4 / q8_0 quantize at load
to what their quantizers give; merging, presets, and the refusals."""
from __future__ import annotations

import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

from llama_erc.kernels import select_ops  # noqa: E402
from llama_erc.kernels.reference_gguf import dequantize_gguf, quantize_q8_0  # noqa: E402
from llama_erc.kernels.reference_nf4 import dequantize_nf4, quantize_nf4  # noqa: E402
from llama_erc.model import LoRAConfig, Transformer, apply_lora, merge_lora, preset, unmerge_lora  # noqa: E402
from llama_erc.model.load import LoadError, load_pretrained  # noqa: E402
from llama_erc.model.quant import (QuantEmbedding, QuantizedWeight, QuantLinear, quant_summary,  # noqa: E402
                                   quantize_model)
from tests.model.helpers_gguf import write_gguf  # noqa: E402
from tests.model.helpers_hf import SPECS, TinySpec, build_forms, make_hf_model, tokens_for  # noqa: E402

UNTIED = TinySpec("untied", hidden=64, heads=4, kv_heads=2, intermediate=96, vocab=97)
TIED = TinySpec("tied", hidden=64, heads=8, kv_heads=2, intermediate=128, vocab=83, tied=True)
# every quantized type the gguf package can write, on every role (embedding and output included); norms F32
TYPES = {"token_embd.weight": "Q8_0", "output.weight": "Q4_1", "blk.0.attn_q.weight": "Q4_0",
         "blk.0.attn_k.weight": "Q4_1", "blk.0.attn_v.weight": "Q8_0", "blk.0.attn_output.weight": "F16",
         "blk.0.ffn_gate.weight": "Q8_0", "blk.0.ffn_up.weight": "Q4_0", "blk.0.ffn_down.weight": "Q4_1",
         "blk.1.attn_q.weight": "Q8_0", "blk.1.attn_k.weight": "BF16", "blk.1.attn_v.weight": "Q4_0",
         "blk.1.attn_output.weight": "Q4_1", "blk.1.ffn_gate.weight": "Q4_1", "blk.1.ffn_up.weight": "Q8_0",
         "blk.1.ffn_down.weight": "Q8_0"}
TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


@pytest.fixture(scope="module", params=[UNTIED, TIED], ids=lambda s: s.name)
def gguf_file(request, tmp_path_factory):
    spec = request.param
    return spec, write_gguf(make_hf_model(spec), tmp_path_factory.mktemp(spec.name) / "m.gguf", types=TYPES)


def _pair(path, dtype, *, lora: bool = True, fused: bool = False, checkpointing: str = "none", dropout=0.0):
    """(dense, quantized) models of one file, with the same adapters (B non-zero so it takes part)."""
    models = []
    for base_quant in ("none", "gguf"):
        m = load_pretrained(path, dtype=dtype, base_quant=base_quant)
        m.activation_checkpointing = checkpointing
        if lora:
            torch.manual_seed(0)
            apply_lora(m, LoRAConfig(rank=4, alpha=8, dropout=dropout, targets=TARGETS), verbose=False)
            with torch.no_grad():
                for name, p in m.named_parameters():
                    if name.endswith("lora_b"):
                        p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
        m.ops = select_ops(fused_lora=fused)
        models.append(m)
    return models


def _lora_steps(m, tokens, steps: int, lr: float) -> list[float]:
    """`steps` AdamW steps of next-token cross-entropy on tokens (B, T); the losses."""
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        logits = m(tokens[:, :-1]).float()  # (B, T-1, V)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_gguf_blocks_are_kept_as_the_file_holds_them(gguf_file):
    spec, path = gguf_file
    dense, quant = _pair(path, torch.float32, lora=False)
    assert isinstance(quant.tok_embeddings, QuantEmbedding) and isinstance(quant.layers[0].attention.wq, QuantLinear)
    assert isinstance(quant.layers[0].attention.wo, torch.nn.Linear)  # F16 in the file: dense
    if spec.tied:
        assert quant.output.weight is quant.tok_embeddings.weight  # one packed tensor, as in the file
    reader = gguf.GGUFReader(str(path))
    raw = {t.name: t for t in reader.tensors}
    q = quant.layers[1].attention.wq.weight
    assert q.fmt == "Q8_0" and q.blocks.dtype == torch.uint8 and not q.blocks.requires_grad
    assert bytes(q.blocks.numpy().tobytes()) == bytes(raw["blk.1.attn_q.weight"].data.tobytes())
    torch.testing.assert_close(q.dequantize(), dense.layers[1].attention.wq.weight, rtol=0, atol=0)
    summary = quant_summary(quant)
    assert summary["formats"]["Q8_0"] >= 4 and 4.5 < summary["bits_per_weight"] < 8.6
    assert sum(isinstance(p, torch.nn.Parameter) and p.dtype == torch.uint8 for p in quant.parameters()) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gguf_logits_bit_identical_to_dequantized_at_load(gguf_file, dtype):
    spec, path = gguf_file
    dense, quant = _pair(path, dtype, lora=False)
    tokens = tokens_for(spec)
    with torch.no_grad():
        torch.testing.assert_close(quant(tokens), dense(tokens), rtol=0, atol=0)


@pytest.mark.parametrize("fused", [False, True], ids=["eager_lora", "fused_lora"])
@pytest.mark.parametrize("checkpointing", ["none", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gguf_lora_training_bit_identical_step_by_step(gguf_file, fused, checkpointing, dtype):
    spec, path = gguf_file
    models = _pair(path, dtype, fused=fused, checkpointing=checkpointing, dropout=0.1)
    tokens = tokens_for(spec, batch=2, length=9)
    losses, grads = [], []
    for m in models:
        torch.manual_seed(1)  # the dropout masks: both models draw the same
        losses.append(_lora_steps(m, tokens, 3, lr=1e-2))
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad})
    assert losses[0] == losses[1]
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * len(TARGETS) * 2
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("fused", [False, True], ids=["eager_lora", "fused_lora"])
@pytest.mark.parametrize("checkpointing", ["none", "full"])
def test_no_weight_sized_tensor_is_saved_for_backward(fused, checkpointing, tmp_path):
    """Every tensor autograd saves in the first forward (checkpointing's own saved inputs included) is recorded;
    none may have a dequantized weight's shape. Every 2-D tensor of the file is quantized (a dense F16 layer
    saves its weight, rightly); tokens are 2 x 7 so no activation shares a weight's shape."""
    spec = TIED
    all_quantized = {k: ("Q4_1" if v in ("F16", "BF16") else v) for k, v in TYPES.items()}
    path = write_gguf(make_hf_model(spec), tmp_path / "q.gguf", types=all_quantized)
    _, quant = _pair(path, torch.float32, fused=fused, checkpointing=checkpointing)
    weight_shapes = {m.shape for m in quant.modules() if isinstance(m, QuantizedWeight)}
    weight_shapes |= {s[::-1] for s in weight_shapes}  # W^T too
    saved = []
    tokens = tokens_for(spec, batch=2, length=7)

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = quant(tokens).float().logsumexp(-1).mean()
    assert saved, "the audit saw nothing: it is not auditing"
    leaked = [s for s in saved if s[0] in weight_shapes and s[1].is_floating_point]
    assert not leaked, f"weight-sized tensors saved for backward: {leaked}"
    loss.backward()  # and backward works from what was saved
    assert all(p.grad is not None for n, p in quant.named_parameters() if n.endswith("lora_a"))


def test_the_audit_would_catch_a_saved_dense_weight(gguf_file):
    """The same audit on the dequantized-at-load model sees the weights autograd saves (the test can fail)."""
    spec, path = gguf_file
    dense, quant = _pair(path, torch.float32)
    shapes = {m.shape for m in quant.modules() if isinstance(m, QuantizedWeight)}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        dense(tokens_for(spec, batch=2, length=7)).sum()
    assert shapes & set(saved)


def test_triton_dequantization_in_the_model_matches_the_twins(gguf_file):
    spec, path = gguf_file
    quant = load_pretrained(path, dtype=torch.float32, base_quant="gguf")
    tokens = tokens_for(spec)
    with torch.no_grad():
        want = quant(tokens)
        quant.ops = select_ops(triton=True)
        torch.testing.assert_close(quant(tokens), want, rtol=1e-5, atol=1e-5)  # RMSNorm/RoPE kernels round apart
        w = quant.layers[0].attention.wk.weight
        torch.testing.assert_close(w.dequantize(), select_ops().dequant_gguf(w.blocks, w.fmt, w.shape, w.dtype),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("base_quant", ["nf4", "q8_0"])
def test_quantized_at_load_is_the_quantizer_of_each_weight(base_quant, tmp_path):
    spec = UNTIED
    path = write_gguf(make_hf_model(spec), tmp_path / "f32.gguf")  # all F32: any form takes nf4 / q8_0
    dense = load_pretrained(path, dtype=torch.float32)
    quant = load_pretrained(path, dtype=torch.float32, base_quant=base_quant)
    for name, m in dense.named_modules():
        if name.rsplit(".", 1)[-1] in TARGETS:
            qw = quant.get_submodule(name).weight
            w = m.weight.detach()
            want = (dequantize_nf4(quantize_nf4(w)) if base_quant == "nf4"
                    else dequantize_gguf(quantize_q8_0(w), "Q8_0", tuple(w.shape)))
            torch.testing.assert_close(qw.dequantize(), want, rtol=0, atol=0)
            with torch.no_grad():
                m.weight.copy_(want)  # the dense model of the quantized weights
    assert isinstance(quant.tok_embeddings, torch.nn.Embedding) and isinstance(quant.output, torch.nn.Linear)
    tokens = tokens_for(spec)
    with torch.no_grad():
        torch.testing.assert_close(quant(tokens), dense(tokens), rtol=0, atol=0)


def test_quantize_model_on_a_preset():
    with torch.device("meta"):
        m = Transformer(preset("tiny"))
    m.to_empty(device="cpu")
    m.tie_weights()
    m.init_weights(generator=torch.Generator().manual_seed(0))
    tokens = torch.randint(0, m.config.vocab_size, (1, 5))
    w = m.layers[0].feed_forward.w2.weight.detach().clone()
    quantize_model(m, "nf4")
    torch.testing.assert_close(m.layers[0].feed_forward.w2.weight.dequantize(), dequantize_nf4(quantize_nf4(w)))
    apply_lora(m, LoRAConfig(targets=("wq", "w2")), verbose=False)
    m(tokens).sum().backward()
    assert m.layers[0].feed_forward.w2.lora_a.grad is not None
    assert quant_summary(m)["formats"] == {"NF4": 7 * m.config.n_layers}


def test_merge_of_a_quantized_base_is_deq_plus_delta_and_unmerges_exactly(gguf_file):
    spec, path = gguf_file
    _, quant = _pair(path, torch.float32)
    layer = quant.layers[0].attention.wq
    packed = layer.weight
    tokens = tokens_for(spec)
    with torch.no_grad():
        before = quant(tokens)
        merge_lora(quant, keep_original=True)  # the file's dense (F16, BF16) layers restored exactly too
        torch.testing.assert_close(layer.weight, packed.dequantize(torch.float32) + layer.delta_weight())
        torch.testing.assert_close(quant(tokens), before, rtol=1e-5, atol=1e-5)
        unmerge_lora(quant)
        assert layer.weight is packed
        torch.testing.assert_close(quant(tokens), before, rtol=0, atol=0)


def test_refusals(tmp_path):
    spec = TinySpec("odd", hidden=48, heads=4, kv_heads=2, intermediate=80, vocab=50)
    path = write_gguf(make_hf_model(spec), tmp_path / "m.gguf")
    with pytest.raises(LoadError, match="base_quant 'int3' is unknown"):
        load_pretrained(path, base_quant="int3")
    with pytest.raises(LoadError, match="q8_0 needs rows of whole 32-element blocks.*layers.0.attention.wq.weight"):
        load_pretrained(path, base_quant="q8_0")
    load_pretrained(path, dtype=torch.float32, base_quant="nf4")  # NF4 blocks run over the flattened weight
    _, dirs = build_forms(SPECS[0], tmp_path / "forms")
    with pytest.raises(LoadError, match="meta-safetensors.*not a GGUF file"):
        load_pretrained(dirs["meta_st"], base_quant="gguf")


def test_smollm2_gguf_blocks_train_like_the_dequantized_file():
    """The real SmolLM2-135M-Instruct GGUF (Q4_1 linears, Q8_0 tied embedding): three fp32 LoRA steps on its own
    blocks log the same losses, bit for bit, as on the file dequantized at load; the packed base is ~3x smaller."""
    from llama_erc.demo import smollm2_gguf
    try:
        path = smollm2_gguf()
    except ValueError as e:
        pytest.skip(str(e))
    dense, quant = _pair(path, torch.float32, fused=True)
    assert quant_summary(quant)["formats"] == {"Q8_0": 1, "Q4_1": 7 * 30}
    tokens = torch.randint(0, 49152, (1, 12), generator=torch.Generator().manual_seed(0))
    assert _lora_steps(dense, tokens, 2, lr=1e-3) == _lora_steps(quant, tokens, 2, lr=1e-3)


def test_the_twin_dequantizes_large_weights_a_chunk_of_rows_at_a_time(monkeypatch):
    import llama_erc.model.quant as quant

    w = torch.randn(40, 64)
    qw = quant.QuantizedWeight("Q8_0", (40, 64), torch.bfloat16, {"blocks": quantize_q8_0(w).view(40, -1)})
    whole = qw.dequantize()
    monkeypatch.setattr(quant, "_TWIN_CHUNK", 64 * 7)  # 6 chunks of rows, the last one short
    torch.testing.assert_close(qw.dequantize(), whole, rtol=0, atol=0)
    torch.testing.assert_close(qw.dequantize(rows=torch.tensor([39, 0, 5] * 5)), whole[[39, 0, 5] * 5], rtol=0, atol=0)
