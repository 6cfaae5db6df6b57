"""The pruned neighbour search agrees with an all-pairs scan where its window covers everything."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from xtok_kd.vocab.fuzzy import nearest_neighbours, token_strings

words = st.text(alphabet="ab cdé的", min_size=0, max_size=6)


def _brute(queries, cands, k):
    from rapidfuzz.distance import Levenshtein

    ids, scores = [], []
    for q in queries:
        sims = [(Levenshtein.normalized_similarity(q, c) if c else -1.0, j) for j, c in enumerate(cands)]
        best = sorted((s, j) for s, j in sims if s > 0 for s, j in [(-s, j)])[:k]
        ids.append([j for _, j in best] + [-1] * (k - len(best)))
        scores.append([-s for s, _ in best] + [0.0] * (k - len(best)))
    return np.asarray(ids), np.asarray(scores, dtype=np.float32)


@settings(max_examples=60, deadline=None)
@given(st.lists(words, min_size=1, max_size=12), st.lists(words, min_size=1, max_size=20), st.integers(1, 4))
def test_full_window_equals_brute_force(queries, cands, k):
    ids, scores = nearest_neighbours(queries, cands, k=k, window=len(cands) + 1, workers=1)
    want_ids, want_scores = _brute(queries, cands, k)
    np.testing.assert_allclose(scores, want_scores, atol=1e-6)
    assert np.array_equal(ids, want_ids)


def test_small_window_finds_close_variants():
    cands = [f"tok{i:05d}" for i in range(2000)] + [" Hello", "ello!", "Bureau"]
    ids, scores = nearest_neighbours(["Hello", "Bureaus"], cands, k=1, window=4)
    assert cands[ids[0, 0]] == " Hello" and scores[0, 0] > 0.8
    assert cands[ids[1, 0]] == "Bureau"


def test_small_window_finds_an_accent_changed_in_the_middle():
    # distractors between the two spellings in the plain and the reversed sort orders
    cands = [" distancia", " difference"] + [f" dista{c}{i:03d}" for c in "nopqrstu" for i in range(20)]
    cands += [f" {i:03d}{c}ancia" for c in "uvwxyz" for i in range(20)]
    cands += [f" diff{c}{i:03d}" for c in "fghijklm" for i in range(20)]
    cands += [f" {i:03d}{c}rence" for c in "fghijk" for i in range(20)]
    ids, scores = nearest_neighbours([" distância", " différence"], cands, k=1, window=4)
    assert [cands[i] for i in ids[:, 0]] == [" distancia", " difference"]
    assert scores[0, 0] == np.float32(0.9) and scores[1, 0] == np.float32(1 - 1 / 11)


def test_token_strings_keep_stray_bytes_distinct():
    s = token_strings([b"\xe4\xbd", "你".encode(), b"a"])
    assert s[1] == "你" and s[2] == "a" and s[0] != s[1] and len(s[0]) == 2


def test_no_candidates_gives_padding():
    ids, scores = nearest_neighbours(["abc"], ["", ""], k=3)
    assert (ids == -1).all() and (scores == 0).all()
