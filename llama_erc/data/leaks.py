"""Cross-corpus leak guard: train dialogues that share an utterance with another corpus' dev or test split.

MELD and EmoryNLP are both cut from Friends, and their splits cross: hundreds of MELD test utterances appear
verbatim in EmoryNLP train, and the other way round. A run that trains on one and is scored on the other (joint
training, as DialogueLLM does, or retrieval across corpora) would have seen its test scenes. So before training,
every train dialogue of every ERC corpus in the run is checked against the dev and test utterances of every
other ERC corpus given to the run (its train, dev and eval specs):

    leak key   the utterance normalised (data.schema.normalize_text: quotes, whitespace), case-folded, backticks
               as apostrophes; utterances under MIN_WORDS words are ignored ("Oh my God!" is not a leak)
    dropped    a train dialogue with any utterance whose key is in another corpus' dev or test keys

Dropped dialogues never reach a batch or a retrieval pool (LeakGuard.train_dialogues is the one way train
dialogues are read when a guard is given). `allow_overlap` keeps them and says so in every report.
Within one corpus the official splits are disjoint by dialogue; a line of 4+ words that recurs across them is a
common phrase, not a leaked scene, so a corpus is not checked against its own dev and test.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from llama_erc.data.corpora import ERC_KINDS, load_dialogues
from llama_erc.data.schema import Dialogue, normalize_text

MIN_WORDS = 4
HELD_OUT = ("dev", "test")


def leak_key(text: str) -> str | None:
    """The text two corpora share when they quote the same line; None under MIN_WORDS words."""
    key = normalize_text(text).casefold().replace("`", "'").replace("\u00b4", "'")
    return key if len(key.split()) >= MIN_WORDS else None


def _corpus(spec: str) -> tuple[str, str]:
    """(kind, resolved path): one corpus whatever spelling of its path a spec uses."""
    kind, _, path = spec.partition("=")
    return kind, os.path.realpath(path)


@dataclass(frozen=True)
class LeakReport:
    allowed: bool  # --allow_overlap: overlapping train dialogues were kept
    # one row per (train corpus, held-out corpus split) that share utterances: {"train", "held_out", "utterances",
    # "dialogues"} (distinct shared utterances, train dialogues holding one)
    pairs: tuple[dict, ...] = ()
    dropped: dict[str, tuple[str, ...]] = field(default_factory=dict)  # train spec -> dialogue ids dropped

    @property
    def n_dropped(self) -> int:
        return sum(len(ids) for ids in self.dropped.values())

    def to_json(self) -> dict:
        return {"allowed": self.allowed, "min_words": MIN_WORDS, "pairs": list(self.pairs),
                "dropped": {spec: list(ids) for spec, ids in self.dropped.items()}}

    def lines(self) -> list[str]:
        """What a run prints."""
        if not self.pairs:
            return ["leak guard: no train dialogue shares an utterance with another corpus' dev or test split"]
        out = [f"leak guard: {p['train']} train shares {p['utterances']} utterances ({p['dialogues']} dialogues) with "
               f"{p['held_out']}" for p in self.pairs]
        if self.allowed:
            out.append("leak guard: --allow_overlap: those dialogues are KEPT; scores on the sets above are not clean")
        else:
            out.append(f"leak guard: dropped {self.n_dropped} train dialogues, from training and retrieval pools ("
                       + ", ".join(f"{spec}: {len(ids)}" for spec, ids in self.dropped.items()) + ")")
        return out


class LeakGuard:
    """The leak check of one run, built from every spec given to it (train, dev and eval): each ERC spec's train
    split, whether it is trained on or is a retrieval pool, is checked against every other corpus' dev and test."""

    def __init__(self, specs: Iterable[str], allow: bool = False):
        self.allow = allow
        erc = [s for s in dict.fromkeys(specs) if s.partition("=")[0] in ERC_KINDS]
        corpora = {_corpus(s): s for s in erc}
        held = {(corpus, split): self._keys(spec, split) for corpus, spec in corpora.items() for split in HELD_OUT}
        self._dialogues: dict[str, list[Dialogue]] = {}
        pairs, dropped = [], {}
        for spec in erc:
            dialogues = self._dialogues[spec] = load_dialogues(*spec.split("=", 1), "train")
            bad: set[str] = set()
            for (corpus, split), keys in held.items():
                if corpus == _corpus(spec):  # a corpus' own splits are disjoint by dialogue (module docstring)
                    continue
                hit = {d.dialogue_id: shared for d in dialogues
                       if (shared := {k for u in d.utterances if (k := leak_key(u.text)) and k in keys})}
                if hit:
                    pairs.append({"train": spec, "held_out": f"{corpora[corpus]} {split}",
                                  "utterances": len(set().union(*hit.values())), "dialogues": len(hit)})
                    bad |= set(hit)
            if bad and not allow:
                dropped[spec] = tuple(d.dialogue_id for d in dialogues if d.dialogue_id in bad)
        self.report = LeakReport(allow, tuple(pairs), dropped)

    @staticmethod
    def _keys(spec: str, split: str) -> set[str]:
        return {k for d in load_dialogues(*spec.split("=", 1), split) for u in d.utterances
                if (k := leak_key(u.text))}

    def train_dialogues(self, spec: str) -> list[Dialogue]:
        """The train split of `spec` without its dropped dialogues."""
        if spec not in self._dialogues:
            raise ValueError(f"the leak guard was not built with {spec!r}; build it from every spec the run reads")
        dialogues = self._dialogues[spec]
        dropped = set(self.report.dropped.get(spec, ()))
        return [d for d in dialogues if d.dialogue_id not in dropped] if dropped else dialogues

    def trained_overlap(self, train_specs: Iterable[str], dropped: dict[str, list[str]], scored: str,
                        split: str) -> dict:
        """What a run's training dialogues (its train specs, less the dialogues its own guard dropped: `dropped`,
        from its run record) share with the split eval.py scores, from another corpus. Every train spec must be
        one the guard was built with."""
        scored_keys = self._keys(scored, split)
        by_spec = {}
        for spec in dict.fromkeys(train_specs):
            if spec.partition("=")[0] not in ERC_KINDS or _corpus(spec) == _corpus(scored):
                continue
            if spec not in self._dialogues:
                raise ValueError(f"the leak guard was not built with {spec!r}; build it from every spec the run reads")
            gone = set(dropped.get(spec, ()))
            hit = {d.dialogue_id: shared for d in self._dialogues[spec] if d.dialogue_id not in gone
                   and (shared := {k for u in d.utterances if (k := leak_key(u.text)) and k in scored_keys})}
            if hit:
                by_spec[spec] = {"utterances": len(set().union(*hit.values())), "dialogues": len(hit)}
        return {"scored": f"{scored} {split}", "utterances": sum(v["utterances"] for v in by_spec.values()),
                "dialogues": sum(v["dialogues"] for v in by_spec.values()), "by_train_spec": by_spec}
