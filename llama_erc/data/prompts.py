"""Dialogue -> Example: DialogueLLM's instruction recipe as pure string functions.

One Example per utterance (the target). The prompt holds, in order: an instruction naming the task, the
dataset and its label words; optional few-shot demonstrations (n utterances drawn once from train with a
fixed seed); with PromptConfig.retrieval "tfidf", a "### Similar example:" section holding the most similar
train utterance of another dialogue with its train label (data/retrieval.py); the k previous utterances with
their speakers (k = PromptConfig.context_turns, "all" for the whole history); the target with its speaker;
the target's supplementary knowledge when it has one; and the answer cue. The response is the label word (EOS
is added at tokenization, data/encode.py):

    ### Instruction:
    Identify the emotion of the target utterance in this MELD conversation. Answer with exactly one of: ...

    ### Context:
    Ann: I lost my keys again.
    Ben: Check the table.

    ### Target:
    Ann: Found them!

    ### Knowledge:
    Ann laughs and holds up a key ring.

    ### Response:

The prompt ends with "### Response:" and no space: the response is tokenized on its own, and SentencePiece's
dummy-prefix space makes prompt ids + response ids equal to the ids of `prompt + " " + response` (checked
on the LLaMA 2 tokenizer in tests). A newline there instead would split "sad" into "s" + "ad".
Examples keep their PromptParts so that truncation can re-render them with fewer context turns.

build_impact_examples makes InstructERC's emotion-impact auxiliary examples: the same previous turns, then
"### Next speaker:" with only the name of the one who speaks next, answered by the label word of what they say.
"""
from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from llama_erc.data.corpora import default_label_words, display_name, fixed_labels
from llama_erc.data.retrieval import nearest_train_utterances
from llama_erc.data.schema import DataError, Dialogue, Utterance

RETRIEVAL = ("none", "tfidf")  # retrieved demonstrations: none, or the TF-IDF nearest train utterance
# InstructERC's speaker warm-up picks among the most frequent speakers only: in MELD and EmoryNLP the six Friends
# main characters say most lines, and the long tail of one-scene speakers cannot be learned from a single line.
SPEAKER_CANDIDATES = 6


@dataclass(frozen=True)
class PromptConfig:
    context_turns: int | str = 2       # previous utterances shown before the target; "all" = whole history
    use_knowledge: bool = True         # show the target's knowledge text when it has one
    n_shots: int = 0                   # few-shot demonstrations; 0 = zero-shot
    seed: int = 0                      # draws the demonstrations
    label_words: Mapping[str, Mapping[str, str]] | None = None   # per dataset {label: word}; default below
    retrieval: str = "none"            # "tfidf": show the most similar train utterance of another dialogue

    def __post_init__(self):
        k = self.context_turns
        if not (k == "all" or (isinstance(k, int) and not isinstance(k, bool) and k >= 0)):
            raise ValueError(f"context_turns must be an int >= 0 or 'all', got {k!r}")
        if self.n_shots < 0:
            raise ValueError(f"n_shots must be >= 0, got {self.n_shots}")
        if self.retrieval not in RETRIEVAL:
            raise ValueError(f"retrieval must be one of {', '.join(RETRIEVAL)}, got {self.retrieval!r}")


@dataclass(frozen=True)
class PromptParts:
    instruction: str
    context: tuple[tuple[str, str], ...]    # (speaker, text), oldest first
    speaker: str | None                     # None: the target is shown without it (the speaker task's answer)
    text: str
    knowledge: str | None = None
    demonstrations: tuple[str, ...] = ()    # rendered few-shot blocks, then the retrieved one(s)
    n_retrieved: int = 0    # how many of the last demonstrations are retrieved ("### Similar example:")
    next_speaker: bool = False    # emotion-impact prompt: only `speaker` is shown, as the one who speaks next


@dataclass(frozen=True)
class Example:
    prompt: str                  # render_prompt(parts) with the full context
    response: str                # the label word
    label: str                   # the canonical label (Utterance.emotion)
    dataset: str
    dialogue_id: str
    utterance_index: int         # position of the target in the dialogue
    parts: PromptParts | None = None    # None for plain prompt/response pairs (no truncation possible)
    choices: tuple[str, ...] = ()       # every label word of the dataset, in label order (for decoding)


def label_words(dataset: str, labels: Sequence[str], cfg: PromptConfig) -> dict[str, str]:
    """{label: word} for `dataset`: cfg.label_words[dataset], else the registry's (data/corpora.py).
    Words must cover exactly the labels and be distinct, so a decoded word maps back to one label."""
    words = dict((cfg.label_words or {}).get(dataset) or default_label_words(dataset, tuple(labels)))
    if set(words) != set(labels):
        raise ValueError(f"label words for {dataset} must cover exactly {tuple(labels)}, got {tuple(words)}")
    _check_answer_words(words.values(), f"label words for {dataset}", words)
    return {label: words[label].strip() for label in labels}


def _check_answer_words(words, what: str, shown) -> None:
    # Decoding scores each answer word and maps the best back (engine/evaluate.py): an empty, multi-line or
    # duplicated word would make that mapping ambiguous.
    clean = [w.strip() for w in words]
    if any(not w or "\n" in w for w in clean) or len(set(clean)) != len(clean):
        raise ValueError(f"{what} must be distinct one-line words, got {shown}")


def instruction(dataset: str, words: Sequence[str]) -> str:
    name = display_name(dataset)
    return (f"Identify the emotion of the target utterance in this {name} conversation. "
            f"Answer with exactly one of: {', '.join(words)}.")


def render_demonstration(u: Utterance, word: str) -> str:
    return f"{u.speaker}: {u.text}\nEmotion: {word}"


def render_prompt(parts: PromptParts) -> str:
    """The prompt text; sections are separated by blank lines and empty sections are left out."""
    sections = [f"### Instruction:\n{parts.instruction}"]
    n_shots = len(parts.demonstrations) - parts.n_retrieved
    if n_shots:
        sections.append("### Examples:\n" + "\n\n".join(parts.demonstrations[:n_shots]))
    if parts.n_retrieved:
        sections.append("### Similar example:\n" + "\n\n".join(parts.demonstrations[n_shots:]))
    if parts.context:
        sections.append("### Context:\n" + "\n".join(f"{s}: {t}" for s, t in parts.context))
    if parts.next_speaker:   # the target's text is what the impact task must not see
        sections.append(f"### Next speaker:\n{parts.speaker}")
    else:
        sections.append(f"### Target:\n{parts.text}" if parts.speaker is None
                        else f"### Target:\n{parts.speaker}: {parts.text}")
    if parts.knowledge:
        sections.append(f"### Knowledge:\n{parts.knowledge}")
    sections.append("### Response:")
    return "\n\n".join(sections)


def with_context(parts: PromptParts, n_turns: int, n_demonstrations: int | None = None) -> PromptParts:
    """`parts` keeping only the `n_turns` most recent context turns (and the first n demonstrations)."""
    context = parts.context[len(parts.context) - n_turns:] if n_turns > 0 else ()
    demos = parts.demonstrations if n_demonstrations is None else parts.demonstrations[:n_demonstrations]
    # the retrieved demonstrations are the last ones, so they are the first to go
    n_retrieved = max(0, parts.n_retrieved - (len(parts.demonstrations) - len(demos)))
    return dataclasses.replace(parts, context=context, demonstrations=demos, n_retrieved=n_retrieved)


def draw_demonstrations(pool: Sequence[Dialogue], n: int, seed: int) -> list[Utterance]:
    """n utterances drawn without replacement from the pool (train dialogues) with a fixed seed."""
    utterances = [u for d in pool for u in d.utterances]
    if n > len(utterances):
        raise ValueError(f"n_shots={n} but the demonstration pool has only {len(utterances)} utterances")
    return random.Random(seed).sample(utterances, n)


def _label_choices(dataset: str, labels: Sequence[str] | None,
                   cfg: PromptConfig) -> tuple[Sequence[str], dict[str, str], tuple[str, ...]]:
    """(labels, {label: word}, the words in label order) for a dataset; labels default to the registry's."""
    if labels is None:
        labels = fixed_labels(dataset)
        if labels is None:
            raise ValueError(f"dataset {dataset!r} has no built-in label set; pass labels=")
    words = label_words(dataset, labels, cfg)
    return labels, words, tuple(words[label] for label in labels)


def build_examples(dialogues: Sequence[Dialogue], dataset: str, cfg: PromptConfig = PromptConfig(), *,
                   labels: Sequence[str] | None = None,
                   demo_pool: Sequence[Dialogue] | None = None,
                   retrieval_pool: Sequence[Dialogue] | None = None) -> list[Example]:
    """One Example per utterance, in dialogue order.

    Args:
        dataset: "meld" | "emorynlp" | "iemocap" or any other name (then `labels` is required).
        labels: the label set; default the registry's (data/corpora.py).
        demo_pool: dialogues to draw few-shot demonstrations from (the train split); needed when n_shots > 0.
        retrieval_pool: the train dialogues to retrieve from (data/retrieval.py); needed when cfg.retrieval is
            not "none". The retrieved utterance is shown with its own train label after any few-shot ones.
    """
    labels, words, choices = _label_choices(dataset, labels, cfg)
    demos: tuple[str, ...] = ()
    if cfg.n_shots:
        if demo_pool is None:
            raise ValueError(f"n_shots={cfg.n_shots} needs demo_pool= (the train dialogues)")
        demos = tuple(render_demonstration(u, words[u.emotion])
                      for u in draw_demonstrations(demo_pool, cfg.n_shots, cfg.seed))
    retrieved = None
    if cfg.retrieval != "none":
        if retrieval_pool is None:
            raise ValueError(f"retrieval={cfg.retrieval!r} needs retrieval_pool= (the train dialogues)")
        # reads the pool's texts and labels and the queries' texts only: a query's gold label plays no part
        retrieved = nearest_train_utterances(dialogues, retrieval_pool)
    task = instruction(dataset, choices)
    examples = []
    for n, d in enumerate(dialogues):
        for i, u in enumerate(d.utterances):
            if u.emotion not in words:
                raise DataError(f"{dataset} dialogue {d.dialogue_id!r} utterance {i}: label {u.emotion!r} "
                                f"not in {tuple(labels)}")
            similar: tuple[str, ...] = ()
            if retrieved is not None:
                r = retrieved[n][i]
                if r.emotion not in words:
                    raise DataError(f"{dataset} retrieval pool: label {r.emotion!r} not in {tuple(labels)}")
                similar = (render_demonstration(r, words[r.emotion]),)
            start = 0 if cfg.context_turns == "all" else max(0, i - cfg.context_turns)
            parts = PromptParts(
                instruction=task, context=tuple((c.speaker, c.text) for c in d.utterances[start:i]),
                speaker=u.speaker, text=u.text, knowledge=u.knowledge if cfg.use_knowledge else None,
                demonstrations=demos + similar, n_retrieved=len(similar))
            examples.append(Example(prompt=render_prompt(parts), response=words[u.emotion], label=u.emotion,
                                    dataset=dataset, dialogue_id=d.dialogue_id, utterance_index=i,
                                    parts=parts, choices=choices))
    return examples


def speaker_instruction(dataset: str, names: Sequence[str]) -> str:
    name = display_name(dataset)
    return f"Identify the speaker of this {name} utterance. Answer with exactly one of: {', '.join(names)}."


def top_speakers(dialogues: Sequence[Dialogue], n: int) -> tuple[str, ...]:
    """The n most frequent speakers, most frequent first; ties go by name, so the order is a function of the
    counts alone and not of the file order."""
    counts: dict[str, int] = {}
    for d in dialogues:
        for u in d.utterances:
            counts[u.speaker] = counts.get(u.speaker, 0) + 1
    return tuple(sorted(counts, key=lambda s: (-counts[s], s))[:n])


def build_speaker_examples(dialogues: Sequence[Dialogue], dataset: str, *,
                           n_speakers: int = SPEAKER_CANDIDATES) -> list[Example]:
    """InstructERC's speaker-identification warm-up: one Example per utterance by one of the `n_speakers` most
    frequent speakers of `dialogues` (the train split), in dialogue order.

    The prompt holds the instruction, which names the candidates, and the utterance text alone: no context, no
    speaker, no knowledge. The response and the label are the speaker's name; `choices` are the candidates.
    Utterances by any other speaker are skipped: they have no answer among the candidates.
    """
    if n_speakers < 2:
        raise ValueError(f"n_speakers must be >= 2 (one candidate is no choice), got {n_speakers}")
    names = top_speakers(dialogues, n_speakers)
    if len(names) < 2:
        raise ValueError(f"{dataset}: speaker identification needs at least 2 speakers, found {list(names)}")
    _check_answer_words(names, f"speaker names of {dataset}", list(names))
    task = speaker_instruction(dataset, names)
    examples = []
    for d in dialogues:
        for i, u in enumerate(d.utterances):
            if u.speaker not in names:
                continue
            parts = PromptParts(instruction=task, context=(), speaker=None, text=u.text)
            examples.append(Example(prompt=render_prompt(parts), response=u.speaker, label=u.speaker,
                                    dataset=dataset, dialogue_id=d.dialogue_id, utterance_index=i,
                                    parts=parts, choices=names))
    return examples


def impact_instruction(dataset: str, words: Sequence[str]) -> str:
    name = display_name(dataset)
    return (f"Predict the emotion of the next speaker's utterance in this {name} conversation. "
            f"Answer with exactly one of: {', '.join(words)}.")


def build_impact_examples(dialogues: Sequence[Dialogue], dataset: str, cfg: PromptConfig = PromptConfig(), *,
                          labels: Sequence[str] | None = None) -> list[Example]:
    """InstructERC's emotion-impact auxiliary task: one Example per utterance that has a previous turn to show.

    The prompt holds the same previous turns the ERC prompt of that utterance shows (cfg.context_turns) and
    then only the name of the one who speaks next ("### Next speaker:"); the response is the label word of
    what they go on to say, whose text and knowledge stay hidden. With context_turns=0 nothing is shown, so
    there are no examples. No demonstrations: they illustrate the ERC task, not this one.
    """
    labels, words, choices = _label_choices(dataset, labels, cfg)
    task = impact_instruction(dataset, choices)
    examples = []
    for d in dialogues:
        for i, u in enumerate(d.utterances):
            if u.emotion not in words:
                raise DataError(f"{dataset} dialogue {d.dialogue_id!r} utterance {i}: label {u.emotion!r} "
                                f"not in {tuple(labels)}")
            start = 0 if cfg.context_turns == "all" else max(0, i - cfg.context_turns)
            if start == i:   # no previous turn shown: nothing to predict the next emotion from
                continue
            parts = PromptParts(instruction=task, context=tuple((c.speaker, c.text) for c in d.utterances[start:i]),
                                speaker=u.speaker, text="", next_speaker=True)
            examples.append(Example(prompt=render_prompt(parts), response=words[u.emotion], label=u.emotion,
                                    dataset=dataset, dialogue_id=d.dialogue_id, utterance_index=i,
                                    parts=parts, choices=choices))
    return examples
