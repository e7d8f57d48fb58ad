"""Retrieved demonstrations (InstructERC): for each utterance, the most similar train utterance of another dialogue.

Similarity is the cosine of TF-IDF vectors (scikit-learn's TfidfVectorizer: lower-cased word uni- and bigrams,
sublinear tf, rows L2-normalised, so a dot product is the cosine). The vocabulary and idf weights are fit on the
pool's texts only (the train split): queries are projected into the train space, so dev/test text never shapes
the weights. Only texts are compared: a query's gold label is never read, and the label shown with the retrieved
utterance is that train utterance's own.

Candidates for a query utterance are every pool utterance outside its own dialogue: a pool dialogue with the
same dialogue_id and the same speakers and texts. For train queries (query dialogues = the pool) that is the leak guard:
an utterance never retrieves itself (its own gold label) nor a turn of its own conversation. A dev/test dialogue
is in no pool dialogue, so every train utterance is a candidate for it, even where a corpus reuses ids across
splits (MELD numbers its dialogues from 0 in each split: dev dialogue 5 is not train dialogue 5).

Choice: the highest score, ties to the lowest pool index (np.argmax takes the first maximum). A query that shares
no term with any candidate scores 0 everywhere and so gets the first candidate in pool order: deterministic, if
uninformative. Scores are computed a chunk of query rows at a time, (rows, n_pool) dense per chunk, so MELD's
~10k train utterances need ~80 MB per 1024-row chunk instead of a full (n_query, n_pool) matrix.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer

from llama_erc.data.schema import Dialogue, Utterance

CHUNK_ROWS = 1024


def _own_spans(dialogues: Sequence[Dialogue]) -> dict[str, list[tuple[Dialogue, int, int]]]:
    """{dialogue_id: [(dialogue, start, end), ...]} into the flattened utterances (a list: ids may repeat)."""
    spans: dict[str, list[tuple[Dialogue, int, int]]] = {}
    start = 0
    for d in dialogues:
        spans.setdefault(d.dialogue_id, []).append((d, start, start + len(d.utterances)))
        start += len(d.utterances)
    return spans


def _turns(d: Dialogue) -> list[tuple[str, str]]:
    return [(u.speaker, u.text) for u in d.utterances]


def _excluded(d: Dialogue, spans: dict[str, list[tuple[Dialogue, int, int]]]) -> list[tuple[int, int]]:
    """The pool spans that are `d` itself: the same id with the same speakers and texts. Labels take no part,
    so what is excluded never depends on a label."""
    return [(s, e) for p, s, e in spans.get(d.dialogue_id, []) if _turns(p) == _turns(d)]


def nearest_train_utterances(queries: Sequence[Dialogue], pool: Sequence[Dialogue], *,
                             chunk_rows: int = CHUNK_ROWS) -> list[list[Utterance]]:
    """Per query dialogue, per utterance: the pool utterance with the highest TF-IDF cosine outside its dialogue.

    Raises ValueError when the pool has no words to index or a query dialogue has no candidate (the pool holds
    nothing but that dialogue)."""
    if chunk_rows <= 0:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    pool_utts = [u for d in pool for u in d.utterances]
    if not pool_utts:
        raise ValueError("retrieval: the pool (train dialogues) has no utterances")
    vectorizer = TfidfVectorizer(lowercase=True, ngram_range=(1, 2), sublinear_tf=True)
    try:
        pool_vecs = vectorizer.fit_transform([u.text for u in pool_utts])   # (n_pool, V) sparse, rows unit-norm
    except ValueError as e:   # scikit-learn's "empty vocabulary": no text has a token of 2+ word characters
        raise ValueError(f"retrieval: the pool's texts give no TF-IDF vocabulary ({e})") from e
    pool_t = pool_vecs.T.tocsr()                                              # (V, n_pool)
    spans = _own_spans(pool)
    own = [_excluded(d, spans) for d in queries]
    # query rows in flattened order, each with the pool spans it may not retrieve from
    rows = [(u.text, own[k]) for k, d in enumerate(queries) for u in d.utterances]
    for d, spans_d in zip(queries, own):
        excluded = sum(e - s for s, e in spans_d)
        if d.utterances and excluded == len(pool_utts):
            raise ValueError(f"retrieval: dialogue {d.dialogue_id!r} has no candidate: the pool holds no other "
                             "dialogue")
    picks: list[int] = []
    for lo in range(0, len(rows), chunk_rows):
        chunk = rows[lo:lo + chunk_rows]
        scores = (vectorizer.transform([text for text, _ in chunk]) @ pool_t).toarray()   # (rows, n_pool)
        for r, (_, own) in enumerate(chunk):
            for s, e in own:
                scores[r, s:e] = -np.inf
        picks.extend(np.argmax(scores, axis=1).tolist())   # first maximum: ties go to the lowest pool index
    out, i = [], 0
    for d in queries:
        out.append([pool_utts[j] for j in picks[i:i + len(d.utterances)]])
        i += len(d.utterances)
    return out
