"""From run config to data: training Sequences and dev/test example sets, all validated before the model loads.

A data spec is KIND=PATH: meld, emorynlp, iemocap and jsonl (dialogue JSONL) go through the ERC pipeline
(dialogues -> DialogueLLM prompts -> label word + EOS); `prompts` is a JSONL of {"prompt", "response"} rows.
Several training specs are mixed into one shuffled set (the paper trains jointly on its three corpora).
"""
from __future__ import annotations

from dataclasses import dataclass

from data import (LABELS, Example, PromptConfig, Tokenizer, attach_knowledge, build_examples, build_impact_examples,
                  dialogue_labels, encode_example, load_dialogues, load_prompt_response_jsonl, mix_examples)
from data.prompts import build_speaker_examples

from .batching import Sequence
from .resume import fingerprint


@dataclass(frozen=True)
class ExampleSet:
    """The examples of one dataset split, with the label set the decoder chooses from."""
    dataset: str
    examples: list[Example]
    labels: tuple[str, ...]  # canonical labels, in the order of each example's `choices` (label words)


def parse_spec(spec: str) -> tuple[str, str]:
    kind, _, path = spec.partition("=")
    return kind, path


def _knowledge_for(knowledge: tuple[str, ...], dataset: str) -> list[str]:
    return [parse_spec(k)[1] for k in knowledge if parse_spec(k)[0] == dataset]


def load_example_set(spec: str, split: str, prompt_cfg: PromptConfig,
                     knowledge: tuple[str, ...] = ()) -> ExampleSet:
    kind, path = parse_spec(spec)
    if kind == "prompts" and split != "train":
        raise ValueError(f"{spec}: prompt/response data has no label set to evaluate; use an ERC kind for dev/test")
    if kind == "prompts" and prompt_cfg.retrieval != "none":
        raise ValueError(f"{spec}: --retrieval {prompt_cfg.retrieval} retrieves from ERC train dialogues; "
                         "prompt/response data has none")
    if kind == "prompts":
        examples = load_prompt_response_jsonl(path)
        return ExampleSet("prompts", examples, tuple(sorted({e.label for e in examples})))
    dialogues = load_dialogues(kind, path, split)
    for sidecar in _knowledge_for(knowledge, kind):
        dialogues = attach_knowledge(dialogues, sidecar, kind, split, allow_missing_utterances=kind == "iemocap")
    needs_train = kind == "jsonl" or prompt_cfg.n_shots or prompt_cfg.retrieval != "none"
    train = load_dialogues(kind, path, "train") if needs_train else None
    labels = dialogue_labels(train) if kind == "jsonl" else None
    # few-shot demonstrations are always drawn from the train split, with PromptConfig's seed; retrieved ones
    # always come from the train split too (whatever `split` is), never reading this split's labels
    examples = build_examples(dialogues, kind, prompt_cfg, labels=labels, demo_pool=train,
                              retrieval_pool=train if prompt_cfg.retrieval != "none" else None)
    if not examples:
        raise ValueError(f"{spec}: the {split} split has no utterances")
    return ExampleSet(kind, examples, tuple(labels) if labels else tuple(LABELS[kind]))


def speaker_examples(spec: str) -> list[Example]:
    """The speaker-identification warm-up examples of an ERC spec's train dialogues (data/prompts.py)."""
    kind, path = parse_spec(spec)
    if kind == "prompts":
        raise ValueError(f"{spec}: --task speaker needs dialogues with speakers; prompt/response data has none")
    return build_speaker_examples(load_dialogues(kind, path, "train"), kind)


def prompt_config(context_turns: str, n_shots: int = 0, seed: int = 0, retrieval: str = "none") -> PromptConfig:
    return PromptConfig(context_turns="all" if context_turns == "all" else int(context_turns), n_shots=n_shots,
                        seed=seed, retrieval=retrieval)


def training_sequences(specs: tuple[str, ...], tok: Tokenizer, *, max_len: int, context_turns: str,
                       knowledge: tuple[str, ...], seed: int) -> list[Sequence]:
    """Every training example tokenized (prompt truncated oldest-context-first), mixed across datasets."""
    return training_data(specs, tok, max_len=max_len, context_turns=context_turns, knowledge=knowledge,
                         seed=seed)[0]


def training_data(specs: tuple[str, ...], tok: Tokenizer, *, max_len: int, context_turns: str,
                  knowledge: tuple[str, ...], seed: int, task: str = "erc", retrieval: str = "none",
                  aux_impact: float = 0.0) -> tuple[list[Sequence], dict[str, dict]]:
    """training_sequences, and {dataset: engine.resume.fingerprint of its sequences}, which a resume compares
    (a dataset is named by its kind, or by its whole spec where two specs share a kind).

    task "speaker": InstructERC's speaker-identification prompts instead of ERC ones; retrieval "tfidf": each
    ERC prompt shows its retrieved demonstration; aux_impact > 0: the emotion-impact examples are added, with
    loss weight aux_impact (see TrainConfig)."""
    if not specs:
        raise ValueError("no training data: pass --train_data KIND=PATH (kinds: meld, emorynlp, iemocap, "
                         "jsonl, prompts)")
    kinds = [parse_spec(s)[0] for s in specs]
    per_set, fingerprints = [], {}
    for spec, kind in zip(specs, kinds):
        examples = (speaker_examples(spec) if task == "speaker"
                    else load_example_set(spec, "train", prompt_config(context_turns, retrieval=retrieval),
                                          knowledge).examples)
        seqs = encode_sequences(tok, examples, max_len)
        if aux_impact > 0 and kind != "prompts":  # the emotion-impact examples join their own dataset's set
            seqs += impact_sequences(spec, tok, context_turns, max_len=max_len, weight=aux_impact)
        per_set.append(seqs)
        fingerprints[kind if kinds.count(kind) == 1 else spec] = fingerprint(seqs)
    return mix_examples(per_set, seed), fingerprints


def impact_sequences(spec: str, tok: Tokenizer, context_turns: str, *, max_len: int, weight: float) -> list[Sequence]:
    """InstructERC's emotion-impact examples of an ERC spec's train dialogues (data/prompts.py), showing the same
    previous turns as the ERC prompts, truncated the same way, each with loss weight `weight` (--aux_impact)."""
    kind, path = parse_spec(spec)
    cfg = prompt_config(context_turns)
    if cfg.context_turns == 0:
        raise ValueError("--aux_impact predicts the next utterance's emotion from the previous turns, and "
                         "--context_turns 0 shows none")
    dialogues = load_dialogues(kind, path, "train")
    labels = dialogue_labels(dialogues) if kind == "jsonl" else None  # as load_example_set's ERC examples
    return encode_sequences(tok, build_impact_examples(dialogues, kind, cfg, labels=labels), max_len, weight)


def encode_sequences(tok: Tokenizer, examples: list[Example], max_len: int, weight: float = 1.0) -> list[Sequence]:
    """Examples -> training Sequences (truncated as data/collate.py says), each token id checked against the
    tokenizer's vocabulary, every supervised token with loss weight `weight`."""
    seqs = []
    for ex in examples:
        ids, labels = encode_example(tok, ex, max_len)
        if max(ids) >= tok.vocab_size:
            raise ValueError(f"token id {max(ids)} is outside the tokenizer's vocabulary of {tok.vocab_size}")
        seqs.append(Sequence(tuple(ids), tuple(labels), weight=weight))
    return seqs
