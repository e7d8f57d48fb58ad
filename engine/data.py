"""From run config to data: training Sequences and dev/test example sets, all validated before the model loads.

A data spec is KIND=PATH: meld, emorynlp, iemocap and jsonl (dialogue JSONL) go through the ERC pipeline
(dialogues -> DialogueLLM prompts -> label word + EOS); `prompts` is a JSONL of {"prompt", "response"} rows.
Several training specs are mixed into one shuffled set (the paper trains jointly on its three corpora).
"""
from __future__ import annotations

from dataclasses import dataclass

from data import (LABELS, Example, PromptConfig, Tokenizer, attach_knowledge, build_examples, dialogue_labels,
                  encode_example, load_dialogues, load_prompt_response_jsonl, mix_examples)

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
    if kind == "prompts":
        examples = load_prompt_response_jsonl(path)
        return ExampleSet("prompts", examples, tuple(sorted({e.label for e in examples})))
    dialogues = load_dialogues(kind, path, split)
    for sidecar in _knowledge_for(knowledge, kind):
        dialogues = attach_knowledge(dialogues, sidecar, kind, split, allow_missing_utterances=kind == "iemocap")
    train = load_dialogues(kind, path, "train") if (kind == "jsonl" or prompt_cfg.n_shots) else None
    labels = dialogue_labels(train) if kind == "jsonl" else None
    # few-shot demonstrations are always drawn from the train split, with PromptConfig's seed
    examples = build_examples(dialogues, kind, prompt_cfg, labels=labels, demo_pool=train)
    if not examples:
        raise ValueError(f"{spec}: the {split} split has no utterances")
    return ExampleSet(kind, examples, tuple(labels) if labels else tuple(LABELS[kind]))


def prompt_config(context_turns: str, n_shots: int = 0, seed: int = 0) -> PromptConfig:
    return PromptConfig(context_turns="all" if context_turns == "all" else int(context_turns), n_shots=n_shots,
                        seed=seed)


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
        seqs = []
        for ex in load_example_set(spec, "train", prompt_config(context_turns), knowledge).examples:
            ids, labels = encode_example(tok, ex, max_len)
            if max(ids) >= tok.vocab_size:
                raise ValueError(f"token id {max(ids)} is outside the tokenizer's vocabulary of {tok.vocab_size}")
            seqs.append(Sequence(tuple(ids), tuple(labels)))
        per_set.append(seqs)
        fingerprints[kind if kinds.count(kind) == 1 else spec] = fingerprint(seqs)
    return mix_examples(per_set, seed), fingerprints
