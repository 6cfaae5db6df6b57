"""Built tables of the shipped pairs and more: exact counts against a brute force, decompositions spell their tokens."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from conftest import tokenizer_path

PAIRS = [("qwen2.5", "llama3.2"), ("qwen2.5", "mistral"), ("llama3.2", "mistral"), ("gpt2", "qwen2.5"),
         ("mistral", "gpt2"), ("mistral", "qwen2.5")]


@pytest.fixture(scope="module", params=PAIRS, ids=lambda p: f"{p[0]}->{p[1]}")
def pair(request):
    from xtok_kd.tokenizer import load_tokenizer
    from xtok_kd.vocab import VocabAlignment

    teacher = load_tokenizer(tokenizer_path(request.param[0]))
    student = load_tokenizer(tokenizer_path(request.param[1]))
    return teacher, student, VocabAlignment.build(teacher, student, progress=False)


def test_exact_count_equals_brute_force(pair):
    teacher, student, table = pair
    # independent count: multiplicity of each byte string on each side, non-special entries only
    t_count = Counter(b for i, b in enumerate(teacher.all_token_bytes()) if b and i not in teacher.special_ids)
    s_count = Counter(b for i, b in enumerate(student.all_token_bytes()) if b and i not in student.special_ids)
    expected = sum(n * s_count[b] for b, n in t_count.items() if b in s_count)
    assert table.exact_teacher.shape[0] == expected
    tb, sb = teacher.all_token_bytes(), student.all_token_bytes()
    assert all(tb[t] == sb[s] for t, s in zip(table.exact_teacher.tolist(), table.exact_student.tolist()))


@pytest.mark.parametrize("direction", ["teacher_to_student", "student_to_teacher"])
def test_every_decomposition_spells_its_token(pair, direction):
    teacher, student, table = pair
    source, target = (teacher, student) if direction == "teacher_to_student" else (student, teacher)
    d = "t2s" if direction == "teacher_to_student" else "s2t"
    offsets = getattr(table, f"{d}_offsets").tolist()
    pieces = getattr(table, f"{d}_pieces").tolist()
    tb = target.all_token_bytes()
    wrong = [
        i for i, b in enumerate(source.all_token_bytes())
        if i not in source.special_ids and b"".join(tb[p] for p in pieces[offsets[i]:offsets[i + 1]]) != b
    ]
    assert wrong == []
    regular = [i for i in range(source.vocab_size) if i not in source.special_ids]
    assert bool((getattr(table, f"{d}_first")[regular] >= 0).all())
    # no special token of the target inside a regular token's decomposition
    assert not set(pieces[offsets[regular[0]]:]).intersection(target.special_ids - set(
        getattr(table, "special_student" if d == "t2s" else "special_teacher").tolist()))


def test_first_and_weight_agree_with_pieces(pair):
    _, _, table = pair
    for d in ("t2s", "s2t"):
        offsets, pieces = getattr(table, f"{d}_offsets"), getattr(table, f"{d}_pieces")
        first, weight = getattr(table, f"{d}_first"), getattr(table, f"{d}_weight")
        mapped = (offsets[1:] > offsets[:-1])
        assert bool((first[mapped] == pieces[offsets[:-1][mapped]]).all())
        assert bool((first[~mapped] == -1).all())
        assert np.array_equal(weight.numpy(), mapped.numpy().astype(np.float32))


def test_projection_coo(pair):
    _, _, table = pair
    src, dst, w = table.projection("teacher_to_student")
    assert src.dtype == dst.dtype and str(src.dtype) == "torch.int64" and str(w.dtype) == "torch.float32"
    assert bool((table.t2s_first[src] == dst).all()) and bool((w == 1.0).all())
    assert src.shape[0] == int((table.t2s_first >= 0).sum())


def test_neighbours_only_for_unmatched_and_scored(pair):
    teacher, student, table = pair
    from rapidfuzz.distance import Levenshtein

    from xtok_kd.vocab.fuzzy import token_strings
    from xtok_kd.vocab.table import half_up

    matched = set(table.exact_teacher.tolist())
    rows = (table.t2s_neighbours[:, 0] >= 0).nonzero().squeeze(1).tolist()
    assert rows and not matched.intersection(rows)
    ts, ss = token_strings(teacher.all_token_bytes()), token_strings(student.all_token_bytes())
    for i in rows[:: max(1, len(rows) // 200)]:
        for j, score in zip(table.t2s_neighbours[i].tolist(), table.t2s_neighbour_scores[i].tolist()):
            if j >= 0:
                assert j not in student.special_ids
                exact = Levenshtein.normalized_similarity(ts[i], ss[j])
                assert score == float(half_up(np.float32([exact]))[0])  # the float16 just at or above it
                assert exact <= score < exact + 2.0 ** -11
    scores = table.t2s_neighbour_scores
    assert bool((scores >= 0).all() and (scores <= 1).all())
    assert bool((scores[:, :-1] >= scores[:, 1:]).all())  # best first
