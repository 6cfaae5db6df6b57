"""Nearest neighbours by normalised edit distance, with candidate pruning instead of an all-pairs scan.

A brute-force MinED (FuseLLM) scores every source token against every target token: ~2e10 pairs for two 150k
vocabularies, about a minute on two cores. Here each query is scored only against candidates that are close to
it in one of several sort orders of the target vocabulary:

* the strings themselves (shared prefix: ``" Bureau"`` / ``" Bure"``);
* the reversed strings (shared suffix: ``"的时候"`` / ``"时候"``);
* the strings with surrounding whitespace removed and lower-cased (``"Hello"`` / ``" hello"``);
* the same, reversed;
* the same with diacritics removed (``" différence"`` / ``" difference"``: one substitution in the middle, which
  puts the two far apart in every other order).

For each order the ``window`` entries on either side of the query's insertion point are candidates; all
``queries x candidates`` pairs are scored in one vectorised ``rapidfuzz.process.cpdist`` call with the same scorer
as a brute force would use, so a neighbour found here has exactly its brute-force score. The benchmark
(``benchmarks/bench_vocab_table.py``) counts how often the best score found differs from the brute force's.
"""

from __future__ import annotations

import unicodedata
from bisect import bisect_left
from typing import Sequence

import numpy as np

__all__ = ["token_strings", "nearest_neighbours", "similarity"]


def token_strings(token_bytes: Sequence[bytes]) -> list[str]:
    """Canonical bytes as ``str`` for edit distances: UTF-8 characters, a stray byte as a lone surrogate.

    ``errors="surrogateescape"`` keeps every byte sequence distinct and never equal to a real character, so a half
    character only matches the same half character.
    """
    return [b.decode("utf-8", errors="surrogateescape") for b in token_bytes]


def similarity():  # noqa: ANN201 - returns a rapidfuzz scorer
    """The scorer: normalised Levenshtein similarity ``1 - d / max(len(a), len(b))`` in [0, 1]."""
    from rapidfuzz.distance import Levenshtein

    return Levenshtein.normalized_similarity


def _sort_keys(cands: Sequence[str], queries: Sequence[str]) -> list[tuple[list[str], list[list[str]]]]:
    """Sort orders of the candidates, each with the query keys looked up in it.

    Besides each order's own key, the whitespace-stripped orders are also searched with the query minus its
    first or last character, which finds a neighbour one insertion away at either end (``" hled"`` / ``" led"``).
    """

    def stripped(strings: Sequence[str]) -> list[str]:
        return [s.strip().lower() for s in strings]

    def folded(strings: Sequence[str]) -> list[str]:
        return ["".join(c for c in unicodedata.normalize("NFKD", s) if not unicodedata.combining(c)) for s in strings]

    c_strip, q_strip = stripped(cands), stripped(queries)
    c_rev, q_rev = [s[::-1] for s in c_strip], [s[::-1] for s in q_strip]
    return [
        (list(cands), [list(queries)]),
        ([s[::-1] for s in cands], [[s[::-1] for s in queries]]),
        (c_strip, [q_strip, [s[1:] for s in q_strip]]),
        (c_rev, [q_rev, [s[1:] for s in q_rev]]),
        (folded(c_strip), [folded(q_strip)]),
    ]


def nearest_neighbours(
    query_strings: Sequence[str],
    candidate_strings: Sequence[str],
    *,
    k: int,
    window: int = 16,
    workers: int = -1,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most similar candidates of every query.

    Args:
        query_strings: ``Q`` strings (see :func:`token_strings`).
        candidate_strings: ``C`` strings; an empty string is never a candidate.
        k: neighbours per query.
        window: candidates taken on each side of the query in each of the five sort orders (so at most
            ``14 * window`` candidates per query are scored: seven query keys).
        workers: rapidfuzz worker threads (-1: all cores).

    Returns:
        ``(ids, scores)``: ``(Q, k)`` int64 indices into ``candidate_strings`` (-1 padded) and ``(Q, k)`` float32
        normalised similarities in (0, 1], best first; ties are broken by the lower candidate index. Candidates
        with similarity 0 (nothing in common) are never neighbours.
    """
    from rapidfuzz import process

    nq = len(query_strings)
    ids = np.full((nq, k), -1, dtype=np.int64)
    scores = np.zeros((nq, k), dtype=np.float32)
    valid = np.asarray([i for i, s in enumerate(candidate_strings) if s], dtype=np.int64)
    if nq == 0 or valid.shape[0] == 0 or k == 0:
        return ids, scores
    cands = [candidate_strings[i] for i in valid.tolist()]
    n = len(cands)
    offsets = np.arange(-window, window, dtype=np.int64)
    blocks = []
    for cand_key, query_keys in _sort_keys(cands, query_strings):
        order = sorted(range(n), key=cand_key.__getitem__)
        ordered = [cand_key[i] for i in order]
        order_arr = np.asarray(order, dtype=np.int64)
        for query_key in query_keys:
            pos = np.fromiter((bisect_left(ordered, q) for q in query_key), dtype=np.int64, count=nq)
            at = np.clip(pos[:, None] + offsets[None, :], 0, n - 1)
            blocks.append(order_arr[at])
    pick = np.sort(np.concatenate(blocks, axis=1), axis=1)  # (Q, M) positions in ``cands``
    duplicate = np.zeros(pick.shape, dtype=bool)
    duplicate[:, 1:] = pick[:, 1:] == pick[:, :-1]

    cand_arr = np.empty(n, dtype=object)
    cand_arr[:] = cands
    query_arr = np.empty(nq, dtype=object)
    query_arr[:] = list(query_strings)
    m = pick.shape[1]
    unique = np.flatnonzero(~duplicate.ravel())  # score each (query, candidate) pair once
    flat = process.cpdist(
        query_arr[unique // m].tolist(), cand_arr[pick.ravel()[unique]].tolist(), scorer=similarity(),
        workers=workers,
    )
    sim = np.full(nq * m, -1.0, dtype=np.float64)
    sim[unique] = flat
    sim = sim.reshape(nq, m)
    # best first; among equal scores the lower candidate index (pick is sorted, so a stable sort keeps it)
    top = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    top_sim = np.take_along_axis(sim, top, axis=1)
    top_ids = valid[np.take_along_axis(pick, top, axis=1)]
    keep = top_sim > 0  # a similarity of 0 shares nothing: no neighbour
    kk = top.shape[1]
    ids[:, :kk] = np.where(keep, top_ids, -1)
    scores[:, :kk] = np.where(keep, top_sim, 0.0).astype(np.float32)
    return ids, scores
