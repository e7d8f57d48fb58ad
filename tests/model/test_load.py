"""WeightSource forms, engine/convert.py round trips, and every bad input -> LoadError naming the file/key."""
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

pytest.importorskip("transformers")

from llama_erc.kernels import select_ops
from llama_erc.model.load import LoadError, detect_form, load_pretrained, open_weights  # noqa: E402
from llama_erc.model.config import from_hf_config  # noqa: E402
from llama_erc.engine.convert import main as convert_main, parse_size  # noqa: E402
from tests.model.helpers_hf import SPECS, build_forms, make_hf_model, save_hf  # noqa: E402

SPEC = SPECS[0]  # GQA, odd sizes
FORM_OF = {"meta_st": "meta-safetensors", "meta_pth": "meta-pth", "hf": "hf-safetensors"}


@pytest.fixture(scope="module")
def forms(tmp_path_factory):
    _, dirs = build_forms(SPEC, tmp_path_factory.mktemp("forms"))
    return dirs


@pytest.fixture
def copy_of(forms, tmp_path):
    """A private, mutable copy of one form's directory."""
    return lambda form: Path(shutil.copytree(forms[form], tmp_path / form))


def _state(path, dtype=torch.float32):
    return {k: v.detach() for k, v in load_pretrained(path, dtype=dtype).state_dict().items()}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _shard_holding(path, key):
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    return path / index[key]


def _rewrite_shard(path, key, edit):
    """Apply edit(tensors: dict) to the shard holding key, and keep the index in step with it."""
    shard = _shard_holding(path, key)
    tensors = {k: v.clone() for k, v in load_file(shard).items()}  # own the bytes: we rewrite this very file
    edit(tensors)
    save_file(tensors, shard)
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    kept = {k: f for k, f in index["weight_map"].items() if f != shard.name}
    index["weight_map"] = kept | dict.fromkeys(tensors, shard.name)
    index_path.write_text(json.dumps(index))


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            del data[k]
        else:
            data[k] = v
    path.write_text(json.dumps(data))


# ---- the forms agree --------------------------------------------------------------------------------


def test_checkpoint_detects_each_form(forms):
    for name, form in FORM_OF.items():
        assert detect_form(forms[name]) == form


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_checkpoint_three_forms_identical_tensors(forms, dtype):
    ref = _state(forms["hf"], dtype)
    assert all(v.dtype == dtype and v.device.type == "cpu" for v in ref.values())
    _assert_same(ref, _state(forms["meta_st"], dtype))
    _assert_same(ref, _state(forms["meta_pth"], dtype))


def test_checkpoint_vocab_minus_one_taken_from_embeddings(forms):
    with open_weights(forms["meta_pth"]) as ckpt:
        assert json.loads((forms["meta_pth"] / "params.json").read_text())["vocab_size"] == -1
        assert ckpt.config.vocab_size == SPEC.vocab
        hf_cfg = from_hf_config(json.loads((forms["hf"] / "config.json").read_text()))
        # max_seq_len is not in Meta's params.json (a runtime choice there), so it keeps its default
        assert ckpt.config == dataclasses.replace(hf_cfg, max_seq_len=ckpt.config.max_seq_len)


def test_checkpoint_load_flags_and_no_meta_left(forms):
    ops = select_ops(triton=True)
    model = load_pretrained(forms["meta_st"], dtype=torch.float32, ops=ops)
    assert model.ops is ops and model.layers[0].attention_norm.ops is ops
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])


def _file_backed(model) -> set[str]:
    """Names of parameters whose bytes live in a memory-mapped checkpoint file (Linux /proc/self/maps)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith((".safetensors", ".pth")):
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            ranges.append((lo, hi))
    return {n for n, p in model.named_parameters() if any(lo <= p.data_ptr() < hi for lo, hi in ranges)}


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_checkpoint_zero_copy_only_when_nothing_converts(forms):
    names = {n for n, _ in load_pretrained(forms["meta_st"], dtype=torch.float32).named_parameters()}
    assert _file_backed(load_pretrained(forms["meta_st"], dtype=torch.float32)) == names  # views of the files
    assert _file_backed(load_pretrained(forms["meta_st"], dtype=torch.bfloat16)) == set()  # cast: owned
    hf = _file_backed(load_pretrained(forms["hf"], dtype=torch.float32))
    assert hf == {n for n in names if not n.endswith(("wq.weight", "wk.weight"))}  # un-permuted: owned


# ---- engine/convert.py ----------------------------------------------------------------------------------


@pytest.mark.parametrize("src", ["hf", "meta_pth"])
def test_convert_round_trips(forms, tmp_path, src):
    dst = tmp_path / "out"
    assert convert_main([str(forms[src]), str(dst), "--max-shard-size", "20KB"]) == 0
    assert detect_form(dst) == "meta-safetensors"
    _assert_same(_state(forms[src]), _state(dst))
    shards = sorted(dst.glob("*.safetensors"))
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert len(shards) > 1 and set(index["weight_map"].values()) == {p.name for p in shards}
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in _state(dst).values())
    assert json.loads((dst / "params.json").read_text())["vocab_size"] == SPEC.vocab  # -1 resolved
    assert (dst / "tokenizer.model").is_file() == (forms[src] / "tokenizer.model").is_file()


def test_convert_keeps_source_dtype_unless_told(forms, tmp_path):
    hf_bf16 = save_hf(make_hf_model(SPEC).to(torch.bfloat16), tmp_path / "hf_bf16")
    assert convert_main([str(hf_bf16), str(tmp_path / "kept")]) == 0
    assert convert_main([str(forms["hf"]), str(tmp_path / "cast"), "--dtype", "bf16"]) == 0
    for d in ("kept", "cast"):
        (shard,) = (tmp_path / d).glob("*.safetensors")  # default 2GB: one shard
        with safe_open(str(shard), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    _assert_same(_state(tmp_path / "cast", torch.bfloat16), _state(forms["hf"], torch.bfloat16))


def test_convert_refuses_bad_source_and_used_destination(forms, tmp_path, capsys):
    assert convert_main([str(tmp_path / "nope"), str(tmp_path / "out")]) == 1
    assert "nope" in capsys.readouterr().err
    assert convert_main([str(forms["hf"]), str(forms["meta_st"])]) == 1
    assert "already holds a checkpoint" in capsys.readouterr().err


def test_convert_parse_size():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("1MiB") == 2**20 and parse_size("4096") == 4096
    with pytest.raises(Exception):
        parse_size("lots")


# ---- bad input: one LoadError each, naming the file or key ------------------------------------


def _raises(path, *needles):
    with pytest.raises(LoadError) as e:
        load_pretrained(path, dtype=torch.float32)
    for n in needles:
        assert str(n) in str(e.value), f"{n!r} not in: {e.value}"
    return str(e.value)


def test_checkpoint_bad_paths(tmp_path):
    _raises(tmp_path / "missing", "missing", "no such file")
    (tmp_path / "f.txt").write_text("x")
    _raises(tmp_path / "f.txt", "f.txt", "not a directory")
    (tmp_path / "empty").mkdir()
    _raises(tmp_path / "empty", "empty", "params.json + consolidated.NN.pth", "config.json", "*.safetensors")


@pytest.mark.parametrize("form,json_name", [("meta_st", "params.json"), ("meta_pth", "params.json"),
                                            ("hf", "config.json")])
def test_checkpoint_missing_or_malformed_json(copy_of, form, json_name):
    path = copy_of(form)
    (path / json_name).write_text("{not json")
    _raises(path, json_name, "malformed JSON")
    (path / json_name).unlink()
    _raises(path, f"no {json_name}")


def test_checkpoint_params_missing_required_key(copy_of):
    path = copy_of("meta_pth")
    _edit_json(path / "params.json", dim=None)
    _raises(path, "params.json", "'dim'")


def test_checkpoint_config_contradicts_layer_count(copy_of):
    path = copy_of("meta_st")
    _edit_json(path / "params.json", n_layers=3)
    _raises(path, "missing keys", "layers.2.attention.wq.weight", "layers.2.ffn_norm.weight")
    _edit_json(path / "params.json", n_layers=1)
    _raises(path, "unexpected keys", "layers.1.feed_forward.w2.weight")


def test_checkpoint_config_contradicts_shapes(copy_of):
    path = copy_of("hf")
    _edit_json(path / "config.json", vocab_size=SPEC.vocab + 3)
    _raises(path, "shape mismatch", "tok_embeddings.weight", f"expected ({SPEC.vocab + 3}, {SPEC.hidden})",
            f"got ({SPEC.vocab}, {SPEC.hidden})")
    path = copy_of("meta_pth")
    _edit_json(path / "params.json", dim=60)  # 6 heads of 10 instead of 8
    _raises(path, "shape mismatch", "layers.0.attention.wq.weight", "expected (60, 60)", f"got ({SPEC.hidden}, 48)")


def test_checkpoint_missing_and_unexpected_tensors(copy_of):
    path = copy_of("meta_st")
    _rewrite_shard(path, "layers.1.attention.wv.weight", lambda t: t.pop("layers.1.attention.wv.weight"))
    _raises(path, "missing keys: layers.1.attention.wv.weight")
    path = copy_of("hf")
    key = "model.layers.0.self_attn.q_proj.weight"
    _rewrite_shard(path, key, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(48)}))
    _raises(path, "unexpected keys: model.layers.0.self_attn.q_proj.bias")


def test_checkpoint_tensor_shape_mismatch(copy_of):
    path = copy_of("meta_st")
    key = "layers.0.feed_forward.w2.weight"
    _rewrite_shard(path, key, lambda t: t.update({key: t[key][:, :-1].contiguous()}))
    _raises(path, "shape mismatch", key, f"expected ({SPEC.hidden}, {SPEC.intermediate})",
            f"got ({SPEC.hidden}, {SPEC.intermediate - 1})")


def test_checkpoint_non_float_tensor(copy_of):
    path = copy_of("meta_st")
    _rewrite_shard(path, "norm.weight", lambda t: t.update({"norm.weight": torch.ones(SPEC.hidden, dtype=torch.int32)}))
    _raises(path, "norm.weight", "I32")


@pytest.mark.parametrize("form", ["meta_st", "hf"])
def test_checkpoint_truncated_safetensors(copy_of, form):
    path = copy_of(form)
    shard = sorted(path.glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-7])
    _raises(path, shard.name, "truncated or corrupt")


def test_checkpoint_truncated_pth(copy_of):
    path = copy_of("meta_pth")
    shard = path / "consolidated.01.pth"
    shard.write_bytes(shard.read_bytes()[:1000])
    _raises(path, "consolidated.01.pth", "truncated or corrupt")


def test_checkpoint_pth_shards_disagree(copy_of):
    path = copy_of("meta_pth")
    shard = torch.load(path / "consolidated.01.pth", weights_only=True)
    shard["layers.0.attention_norm.weight"] = shard["layers.0.attention_norm.weight"][:-2].clone()
    torch.save(shard, path / "consolidated.01.pth")
    _raises(path, "consolidated.01.pth", "layers.0.attention_norm.weight")
    (path / "consolidated.01.pth").rename(path / "consolidated.02.pth")
    _raises(path, "consolidated.00.pth .. consolidated.01.pth", "consolidated.02.pth")


def test_checkpoint_index_problems(copy_of):
    path = copy_of("meta_st")
    index_path = path / "model.safetensors.index.json"
    good = index_path.read_text()
    index_path.write_text("[1, 2")
    _raises(path, "model.safetensors.index.json", "malformed JSON")
    index = json.loads(good)
    index["weight_map"]["output.weight"] = "model-99999-of-99999.safetensors"
    index_path.write_text(json.dumps(index))
    _raises(path, "model-99999-of-99999.safetensors")
    index = json.loads(good)
    index["weight_map"]["layers.9.attention.wq.weight"] = index["weight_map"]["output.weight"]
    index_path.write_text(json.dumps(index))
    _raises(path, "layers.9.attention.wq.weight")


def test_checkpoint_duplicate_key_across_shards(copy_of):
    path = copy_of("meta_st")
    shard = _shard_holding(path, "norm.weight")
    (path / "model.safetensors.index.json").unlink()  # without an index every *.safetensors counts
    save_file({"norm.weight": torch.ones(SPEC.hidden)}, path / "zz-extra.safetensors")
    _raises(path, "norm.weight", shard.name, "zz-extra.safetensors")


def test_checkpoint_safetensors_without_their_json(copy_of):
    path = copy_of("hf")
    (path / "config.json").rename(path / "params.json")  # a params.json does not make HF names Meta
    _raises(path, "HF-named", "no config.json")
