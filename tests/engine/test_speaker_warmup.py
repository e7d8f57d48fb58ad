"""InstructERC's speaker-identification warm-up: `--task speaker` prompts, and `--init_adapters` starting the ERC
stage from that stage's adapters (exactly, before any step; a resume keeps its own checkpoint's weights)."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import llama_erc.engine.train as engine_train
import train as train_script
from llama_erc.data.encode import IGNORE_INDEX, encode_example
from llama_erc.data import load_dialogues
from llama_erc.data.prompts import build_speaker_examples, top_speakers
from llama_erc.engine.checkpoint import init_adapters_file, trainable_state
from llama_erc.engine.config import TrainConfig

# speaker: lines. Phoebe (2) is met before Joey (2), and Rachel (1) before Gunther (1): ties must go by name.
LINES = {"Monica": 5, "Ross": 4, "Phoebe": 2, "Joey": 2, "Chandler": 3, "Rachel": 1, "Janice": 1, "Gunther": 1}
TOP6 = ("Monica", "Ross", "Chandler", "Joey", "Phoebe", "Gunther")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A dialogue JSONL whose train split has the speaker counts of LINES, three turns per dialogue."""
    turns = [{"speaker": s, "text": f"line {i} of the story", "emotion": ("joy", "neutral")[i % 2]}
             for s, n in LINES.items() for i in range(n)]
    rows = [{"dialogue_id": f"d{k}", "split": "train", "utterances": turns[k:k + 3]} for k in range(0, len(turns), 3)]
    path = tmp_path_factory.mktemp("corpus") / "erc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _argv(tok, out, data, *extra):
    return ["--model", "tiny", "--tokenizer", tok, "--train_data", f"jsonl={data}", "--out_dir", str(out),
            "--dtype", "fp32", "--device", "cpu", "--kernels", "off", "--micro_batch", "4", "--grad_accum", "1",
            "--activation_checkpointing", "none", "--max_steps", "2", "--lr", "1e-2", *extra]


@pytest.fixture(scope="module")
def speaker_run(tmp_path_factory, demo_tokenizer, corpus):
    out = tmp_path_factory.mktemp("stage1") / "speaker"
    assert train_script.main(_argv(demo_tokenizer, out, corpus, "--task", "speaker")) == 0
    return out


def test_speaker_prompts_hide_context_and_speaker(corpus):
    dialogues = load_dialogues("jsonl", corpus, "train")
    assert top_speakers(dialogues, 6) == TOP6
    examples = build_speaker_examples(dialogues, "jsonl")
    assert len(examples) == sum(LINES.values()) - LINES["Rachel"] - LINES["Janice"]  # the others are skipped
    assert {e.label for e in examples} == set(TOP6)
    for e in examples:
        utterance = dialogues[int(e.dialogue_id[1:]) // 3].utterances[e.utterance_index]
        assert e.response == e.label == utterance.speaker and e.choices == TOP6
        assert e.parts.context == () and e.parts.knowledge is None and e.parts.demonstrations == ()
        body = e.prompt.split("### Target:\n", 1)[1]
        assert body == f"{utterance.text}\n\n### Response:"  # the utterance alone: no speaker, no context
        assert "Context" not in e.prompt and e.prompt.startswith(
            "### Instruction:\nIdentify the speaker of this jsonl utterance. Answer with exactly one of: "
            "Monica, Ross, Chandler, Joey, Phoebe, Gunther.")


def test_speaker_example_encodes_with_the_name_as_the_only_target(corpus, demo_tokenizer):
    from llama_erc.data import load_tokenizer
    tok = load_tokenizer(demo_tokenizer)
    ex = build_speaker_examples(load_dialogues("jsonl", corpus, "train"), "jsonl")[0]
    ids, labels = encode_example(tok, ex, 256)
    supervised = [t for t in labels if t != IGNORE_INDEX]
    assert supervised == tok.encode(ex.response) + [tok.eos_id]


def test_speaker_names_must_be_distinct_lines(corpus):
    from llama_erc.data.schema import Dialogue, Utterance
    dialogues = [Dialogue("x", (Utterance("Ann\nLee", "hi", "joy"), Utterance("Bo", "yo", "joy")))]
    with pytest.raises(ValueError, match="distinct one-line words"):
        build_speaker_examples(dialogues, "jsonl")
    with pytest.raises(ValueError, match="at least 2 speakers"):
        build_speaker_examples([Dialogue("y", (Utterance("Bo", "yo", "joy"),))], "jsonl")


def test_erc_stage_starts_from_the_speaker_adapters(tmp_path, demo_tokenizer, corpus, speaker_run, monkeypatch):
    saved = json.loads((speaker_run / "config.json").read_text())
    assert saved["task"] == "speaker"
    want = load_file(str(speaker_run / "checkpoints" / "step_0000002" / "adapters.safetensors"))
    seen = {}

    def capture(cfg, rt, model, *args, **kwargs):  # the adapters as training would start from them
        seen.update(trainable_state(model))
        return {"step": 0}

    monkeypatch.setattr(engine_train, "train_loop", capture)
    out = tmp_path / "erc"
    assert train_script.main(_argv(demo_tokenizer, out, corpus, "--init_adapters", str(speaker_run))) == 0
    assert set(seen) == set(want) and all(torch.equal(seen[k], want[k]) for k in want)
    assert json.loads((out / "config.json").read_text())["init_adapters"] == str(speaker_run)


def test_resume_keeps_the_checkpoint_not_the_init_adapters(tmp_path, demo_tokenizer, corpus, speaker_run):
    out = tmp_path / "erc"
    argv = _argv(demo_tokenizer, out, corpus, "--init_adapters", str(speaker_run), "--save_every", "1",
                 "--keep_last", "5")
    assert train_script.main(argv) == 0
    step2 = out / "checkpoints" / "step_0000002"
    want = load_file(str(step2 / "adapters.safetensors"))
    speaker = load_file(str(speaker_run / "checkpoints" / "step_0000002" / "adapters.safetensors"))
    assert any(not torch.equal(want[k], speaker[k]) for k in want)  # the ERC stage did move the adapters
    shutil.rmtree(step2)  # as if interrupted after step 1: the resume must redo step 2 from step 1's weights
    assert train_script.main(argv + ["--resume"]) == 0
    got = load_file(str(step2 / "adapters.safetensors"))
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_init_adapters_with_another_lora_rank_is_refused(tmp_path, demo_tokenizer, corpus, speaker_run, capsys):
    out = tmp_path / "erc"
    argv = _argv(demo_tokenizer, out, corpus, "--init_adapters", str(speaker_run), "--lora_rank", "4")
    assert train_script.main(argv) == 2
    err = capsys.readouterr().err
    assert "lora_rank was 8 in that run, 4 now" in err
    assert not out.exists()  # refused before anything was written or loaded
    with pytest.raises(ValueError, match="lora_targets"):
        init_adapters_file(speaker_run, {"lora_rank": 8, "lora_alpha": 16.0, "lora_targets": ("wq",)})


def test_init_adapters_missing_or_empty_path_is_refused(tmp_path, demo_tokenizer, corpus, capsys):
    argv = _argv(demo_tokenizer, tmp_path / "erc", corpus, "--init_adapters", str(tmp_path / "nope"))
    assert train_script.main(argv) == 2
    assert f"--init_adapters {tmp_path / 'nope'}: no such run or checkpoint directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no adapters.safetensors"):
        init_adapters_file(tmp_path / "empty", {})


def test_speaker_task_refuses_dev_data_and_prompt_data(tmp_path, demo_tokenizer, corpus, capsys):
    with pytest.raises(ValueError, match="--task speaker cannot take --dev_data"):
        TrainConfig(task="speaker", train_data=(f"jsonl={corpus}",), dev_data=(f"jsonl={corpus}",))
    argv = ["--model", "tiny", "--tokenizer", demo_tokenizer, "--train_data", "prompts=x.jsonl", "--task", "speaker",
            "--out_dir", str(tmp_path / "r"), "--device", "cpu", "--dtype", "fp32"]
    assert train_script.main(argv) == 2
    assert "prompts=x.jsonl: --task speaker needs dialogues with speakers" in capsys.readouterr().err
