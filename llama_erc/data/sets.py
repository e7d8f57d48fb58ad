"""From a run's data config to what the engine consumes: training Sequences and the example sets it decodes.

    cfg = DataConfig(train_data=("meld=../shared/data/meld",), dev_data=("meld=../shared/data/meld",))
    seqs, fingerprints = training_data(cfg, codec, seed=1234)   # tokenized, weighted, mixed, fingerprinted
    dev = [load_example_set(spec, "dev", cfg.prompt_config(), cfg.knowledge) for spec in cfg.dev_data]

A data spec is KIND=PATH (data/corpora.py): the ERC kinds go through the ERC pipeline (dialogues -> DialogueLLM
prompts -> label word + end token); `prompts` is a JSONL of {"prompt", "response"} rows. Several training specs
are mixed into one shuffled set (the paper trains jointly on its three corpora). Everything here runs, and
fails with the file, spec or value named, before any model is loaded.

A new data lever is one field of DataConfig (TrainConfig inherits it: one flag of train.py, one key of the run
record) and its builder here or in prompts.py.
"""
from __future__ import annotations

import hashlib
import random
from array import array
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass
from pathlib import Path

from llama_erc.data.codec import PROMPT_FORMATS, PromptCodec
from llama_erc.data.corpora import DATA_KINDS, ERC_KINDS, PROMPTS_KIND, corpus, load_dialogues
from llama_erc.data.encode import IGNORE_INDEX, encode_example, load_prompt_response_jsonl
from llama_erc.data.knowledge import attach_knowledge
from llama_erc.data.leaks import LeakGuard
from llama_erc.data.prompts import (RETRIEVAL, Example, PromptConfig, build_examples, build_impact_examples,
                                    build_speaker_examples)
from llama_erc.data.schema import Dialogue, dialogue_labels

TASKS = ("erc", "speaker")  # speaker: InstructERC's speaker-identification warm-up stage (prompts.py)


@dataclass(frozen=True)
class DataConfig:
    """What a run reads and how its prompts are built. TrainConfig inherits these fields."""
    # "kind=path" items, kind in data.corpora.DATA_KINDS ("prompts" = JSONL of {"prompt", "response"})
    train_data: tuple[str, ...] = ()
    dev_data: tuple[str, ...] = ()
    knowledge: tuple[str, ...] = ()  # "dataset=path" sidecar CSV/JSONL of supplementary knowledge
    context_turns: str = "2"  # previous utterances in each prompt: an integer or "all"
    max_len: int = 512
    prompt_format: str = "alpaca"  # alpaca (DialogueLLM's ### sections) | chat (the model's own chat template)
    # ERC levers beyond DialogueLLM's prompt (README, "ERC levers")
    task: str = "erc"  # erc | speaker (InstructERC's speaker-identification warm-up stage; data/prompts.py)
    retrieval: str = "none"  # none | tfidf: show the most similar train utterance of another dialogue, with its label
    aux_impact: float = 0.0  # weight alpha of the emotion-impact auxiliary task (next speaker's emotion); 0 = off
    # (its label tokens weigh alpha, ERC's 1; a step's loss is the weighted mean sum w*CE / sum w, engine/loop.py)
    allow_overlap: bool = False  # keep train dialogues sharing an utterance with another corpus' dev/test (leaks.py)

    def __post_init__(self) -> None:
        check_choice("prompt_format", self.prompt_format, PROMPT_FORMATS)
        check_choice("task", self.task, TASKS)
        check_choice("retrieval", self.retrieval, RETRIEVAL)
        if not 0.0 <= self.aux_impact <= 1.0:
            raise ValueError(f"--aux_impact must be in [0, 1] (the auxiliary loss weight alpha), got {self.aux_impact}")
        if self.task == "speaker" and (self.aux_impact or self.retrieval != "none"):
            raise ValueError("--task speaker is the context-free warm-up stage: it takes no --aux_impact or "
                             "--retrieval")
        if self.task == "speaker" and self.dev_data:
            # the dev evaluator scores emotion label words; a speaker stage is judged by the ERC stage after it
            raise ValueError("--task speaker cannot take --dev_data: dev evaluation scores emotions, not speakers; "
                             "evaluate the ERC stage that continues from it (--init_adapters)")
        if self.max_len <= 0:
            raise ValueError(f"--max_len must be positive, got {self.max_len}")
        check_context_turns(self.context_turns)
        check_specs(self.train_data + self.dev_data, DATA_KINDS)
        check_knowledge(self.knowledge, self.train_data + self.dev_data)

    def leak_guard(self, *eval_specs: str) -> LeakGuard:
        """The run's leak guard (data/leaks.py): every spec it reads, with eval.py's when it scores others."""
        return LeakGuard([*self.train_data, *self.dev_data, *eval_specs], allow=self.allow_overlap)

    def prompt_config(self, n_shots: int = 0, shot_seed: int = 0) -> PromptConfig:
        """How this run's ERC prompts are built (with n_shots demonstrations drawn by shot_seed, for eval.py)."""
        turns = self.context_turns
        return PromptConfig(context_turns="all" if turns == "all" else int(turns), n_shots=n_shots, seed=shot_seed,
                            retrieval=self.retrieval)


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"--{name} must be one of {', '.join(choices)}, got {value!r}")


def check_context_turns(value, words: tuple[str, ...] = ("all",)) -> None:
    if not (isinstance(value, str) and (value in words or value.isdigit())):
        raise ValueError(f"--context_turns must be a non-negative integer or 'all', got {value!r}")


def check_specs(specs: tuple[str, ...], kinds: tuple[str, ...]) -> None:
    """Each spec is KIND=PATH with KIND in `kinds`."""
    for spec in specs:
        if "=" not in spec or parse_spec(spec)[0] not in kinds:
            raise ValueError(f"data spec {spec!r} must be KIND=PATH with KIND in {', '.join(kinds)}")


def check_knowledge(specs: tuple[str, ...], data_specs: tuple[str, ...]) -> None:
    """Each --knowledge item is DATASET=FILE.csv|.jsonl, DATASET the kind of one of the data specs."""
    kinds = sorted({parse_spec(s)[0] for s in data_specs})
    for spec in specs:
        kind, eq, path = spec.partition("=")
        if not eq or kind not in ERC_KINDS or not path:
            raise ValueError(f"knowledge spec {spec!r} must be DATASET=PATH with DATASET in {', '.join(ERC_KINDS)}")
        if Path(path).suffix not in (".csv", ".jsonl"):
            raise ValueError(f"knowledge spec {spec!r}: the sidecar must be a .csv or .jsonl file")
        if kind not in kinds:
            raise ValueError(f"knowledge spec {spec!r} attaches to {kind}, but no data spec is of that kind "
                             f"(data kinds: {', '.join(kinds) or 'none'})")


def parse_spec(spec: str) -> tuple[str, str]:
    kind, _, path = spec.partition("=")
    return kind, path


# ---------------------------------------------------------------- example sets (what the decoder scores)

@dataclass(frozen=True)
class ExampleSet:
    """The examples of one dataset split, with the label set the decoder chooses from."""
    dataset: str
    examples: list[Example]
    labels: tuple[str, ...]  # canonical labels, in the order of each example's `choices` (label words)


def _knowledge_for(knowledge: tuple[str, ...], dataset: str) -> list[str]:
    return [parse_spec(k)[1] for k in knowledge if parse_spec(k)[0] == dataset]


def load_example_set(spec: str, split: str, prompt_cfg: PromptConfig, knowledge: tuple[str, ...] = (),
                     guard: LeakGuard | None = None) -> ExampleSet:
    """One split of a spec as examples. With a leak guard, the train split (as examples, or as the pool of
    few-shot and retrieved demonstrations) comes without the dialogues the guard drops."""
    kind, path = parse_spec(spec)
    if kind == PROMPTS_KIND and split != "train":
        raise ValueError(f"{spec}: prompt/response data has no label set to evaluate; use an ERC kind for dev/test")
    if kind == PROMPTS_KIND and prompt_cfg.retrieval != "none":
        raise ValueError(f"{spec}: --retrieval {prompt_cfg.retrieval} retrieves from ERC train dialogues; "
                         "prompt/response data has none")
    if kind == PROMPTS_KIND:
        examples = load_prompt_response_jsonl(path)
        return ExampleSet(PROMPTS_KIND, examples, tuple(sorted({e.label for e in examples})))
    fixed_labels = corpus(kind).labels  # None: the label set is the train split's emotions
    dialogues = _train_dialogues(spec, guard) if split == "train" else load_dialogues(kind, path, split)
    for sidecar in _knowledge_for(knowledge, kind):
        dialogues = attach_knowledge(dialogues, sidecar, kind, split,
                                     allow_missing_utterances=corpus(kind).drops_turns)
    needs_train = prompt_cfg.n_shots or prompt_cfg.retrieval != "none"
    train = _train_dialogues(spec, guard) if needs_train else None
    labels = fixed_labels if fixed_labels is not None else corpus_labels(spec)
    # few-shot demonstrations are always drawn from the train split, with PromptConfig's seed; retrieved ones
    # always come from the train split too (whatever `split` is), never reading this split's labels
    examples = build_examples(dialogues, kind, prompt_cfg, labels=labels, demo_pool=train,
                              retrieval_pool=train if prompt_cfg.retrieval != "none" else None)
    if not examples:
        raise ValueError(f"{spec}: the {split} split has no utterances")
    return ExampleSet(kind, examples, tuple(labels))


def dev_sets(cfg: DataConfig, guard: LeakGuard | None = None) -> list[ExampleSet]:
    """The dev split of every --dev_data spec, prompted as the run trains."""
    return [load_example_set(spec, "dev", cfg.prompt_config(), cfg.knowledge, guard) for spec in cfg.dev_data]


def corpus_labels(spec: str) -> tuple[str, ...]:
    """A spec's label set: the registry's, else (generic JSONL) the emotions of its whole train split, so that
    the leak guard dropping dialogues never changes which labels a corpus has."""
    kind, path = parse_spec(spec)
    return corpus(kind).labels or dialogue_labels(load_dialogues(kind, path, "train"))


def _train_dialogues(spec: str, guard: LeakGuard | None) -> list[Dialogue]:
    """The one way this module reads a train split: through the leak guard when there is one."""
    return guard.train_dialogues(spec) if guard is not None else load_dialogues(*parse_spec(spec), "train")


# ---------------------------------------------------------------- training sequences

@dataclass(frozen=True)
class Sequence:
    """One tokenized training example: ids and labels of equal length (labels -100 where unsupervised), and
    the loss weight of each of its supervised tokens (1 for ERC, alpha for auxiliary examples)."""
    ids: tuple[int, ...]
    labels: tuple[int, ...]
    weight: float = 1.0

    @property
    def n_supervised(self) -> int:
        # labels are aligned with ids; the first position never has a predecessor to predict it
        return sum(1 for y in self.labels[1:] if y != IGNORE_INDEX)

    @property
    def supervised_weight(self) -> float:
        """This example's part of the loss denominator, sum_t w_t over its supervised tokens."""
        return self.weight * self.n_supervised


def encode_sequences(codec: PromptCodec, examples: list[Example], max_len: int,
                     weight: float = 1.0) -> list[Sequence]:
    """Examples -> training Sequences (truncated as data/encode.py says), each token id checked against the
    tokenizer's vocabulary, every supervised token with loss weight `weight`."""
    seqs = []
    for ex in examples:
        ids, labels = encode_example(codec, ex, max_len)
        if max(ids) >= codec.vocab_size:
            raise ValueError(f"token id {max(ids)} is outside the tokenizer's vocabulary of {codec.vocab_size}")
        seqs.append(Sequence(tuple(ids), tuple(labels), weight=weight))
    return seqs


def speaker_examples(spec: str, guard: LeakGuard | None = None) -> list[Example]:
    """The speaker-identification warm-up examples of an ERC spec's train dialogues (data/prompts.py)."""
    kind = parse_spec(spec)[0]
    if kind == PROMPTS_KIND:
        raise ValueError(f"{spec}: --task speaker needs dialogues with speakers; prompt/response data has none")
    return build_speaker_examples(_train_dialogues(spec, guard), kind)


def impact_sequences(spec: str, codec: PromptCodec, cfg: DataConfig, guard: LeakGuard | None = None) -> list[Sequence]:
    """InstructERC's emotion-impact examples of an ERC spec's train dialogues (data/prompts.py), showing the same
    previous turns as the ERC prompts, truncated the same way, each with loss weight cfg.aux_impact."""
    kind = parse_spec(spec)[0]
    pcfg = cfg.prompt_config()
    if pcfg.context_turns == 0:
        raise ValueError("--aux_impact predicts the next utterance's emotion from the previous turns, and "
                         "--context_turns 0 shows none")
    dialogues = _train_dialogues(spec, guard)
    labels = corpus_labels(spec) if corpus(kind).labels is None else None  # as load_example_set's
    return encode_sequences(codec, build_impact_examples(dialogues, kind, pcfg, labels=labels), cfg.max_len,
                            cfg.aux_impact)


def mix_examples(example_lists: SequenceOf[SequenceOf], seed: int) -> list:
    """Joint training over several datasets: concatenate and shuffle with a fixed seed. Each example keeps
    its own dataset's instruction and label words, so label sets never mix within a prompt."""
    mixed = [e for examples in example_lists for e in examples]
    random.Random(seed).shuffle(mixed)
    return mixed


def fingerprint(seqs: list[Sequence]) -> dict:
    """{"examples": count, "sha256": hash of every example's length, token ids, labels and weight, in order}:
    what a resume compares to refuse changed training data (engine/resume.py)."""
    h = hashlib.sha256()
    for s in seqs:
        h.update(len(s.ids).to_bytes(4, "little"))
        h.update(array("q", s.ids).tobytes())
        h.update(array("q", s.labels).tobytes())
        if s.weight != 1.0:  # weight-1 examples hash as they did before weights existed: old checkpoints resume
            h.update(array("d", [s.weight]).tobytes())
    return {"examples": len(seqs), "sha256": h.hexdigest()}


def training_data(cfg: DataConfig, codec: PromptCodec, seed: int,
                  guard: LeakGuard | None = None) -> tuple[list[Sequence], dict[str, dict]]:
    """Every training example of cfg.train_data tokenized (prompt truncated oldest-context-first) and mixed
    across datasets with `seed`; and {dataset: fingerprint of its sequences}, which a resume compares (a dataset
    is named by its kind, or by its whole spec where two specs share a kind).

    task "speaker": InstructERC's speaker-identification prompts instead of ERC ones; retrieval "tfidf": each
    ERC prompt shows its retrieved demonstration; aux_impact > 0: the emotion-impact examples are added, with
    loss weight aux_impact. `guard` (default: cfg.leak_guard()) keeps dialogues that leak into another corpus'
    dev or test split out (data/leaks.py)."""
    if not cfg.train_data:
        raise ValueError(f"no training data: pass --train_data KIND=PATH (kinds: {', '.join(DATA_KINDS)})")
    guard = guard if guard is not None else cfg.leak_guard()
    kinds = [parse_spec(s)[0] for s in cfg.train_data]
    per_set, fingerprints = [], {}
    for spec, kind in zip(cfg.train_data, kinds):
        examples = (speaker_examples(spec, guard) if cfg.task == "speaker"
                    else load_example_set(spec, "train", cfg.prompt_config(), cfg.knowledge, guard).examples)
        seqs = encode_sequences(codec, examples, cfg.max_len)
        if cfg.aux_impact > 0 and kind != PROMPTS_KIND:  # the emotion-impact examples join their own dataset's set
            seqs += impact_sequences(spec, codec, cfg, guard)
        per_set.append(seqs)
        fingerprints[kind if kinds.count(kind) == 1 else spec] = fingerprint(seqs)
    return mix_examples(per_set, seed), fingerprints
