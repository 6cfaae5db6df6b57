"""Property tests: byte-exact spans and chunk invariants on random Unicode, for real tokenizer pairs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xtok_kd.sequence import align_spans

FRAGMENTS = [
    "你好世界", "東京都", "한국어", "👨‍👩‍👧", "🤷‍♂️", "🏳️‍🌈", "👍🏽", "é", "e\u0301", "a\u0308\u0323", "Ω", "ﬁ",
    "2024", "3.14159", "1,000,000", "   ", "\t\t", "\n\n\n", " \n ", "def f(x):\n    return x ** 2\n",
    "if (a && b) { c++; }", "for i in range(10):", "<div class=\"x\">", "'s", " don't", "—", "…", "\u00a0",
]
ALPHABET = st.characters(
    codec="utf-8",
    categories=("Lu", "Ll", "Lo", "Nd", "Mn", "Po", "Ps", "Pe", "Sm", "So", "Zs", "Cc"),
    exclude_characters="\x00\r",
)
TEXTS = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(ALPHABET, min_size=1, max_size=8)),
                 min_size=1, max_size=12).map("".join).filter(lambda t: t.strip() != "")

PAIRS = [("qwen", "llama"), ("qwen", "mistral"), ("llama", "gpt2"), ("mistral", "gpt2")]
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def check_spans(view, text: str) -> None:
    data = text.encode("utf-8")
    enc = view.encode(text)
    spans = enc.spans
    assert enc.uncovered_bytes == 0
    # Concatenating each token's span bytes reproduces the text exactly.
    assert b"".join(data[a:b] for a, b in spans) == data
    content = spans[:, 1] > spans[:, 0]
    assert (np.diff(spans[content].ravel()) >= 0).all()
    if view.family == "byte_level" and view.name.endswith(("llama3.2", "gpt2")):
        # No normaliser: each token's canonical bytes ARE its span's bytes.
        for tid, (a, b) in zip(enc.ids[content], spans[content]):
            assert view.token_bytes(int(tid)) == data[a:b]


def check_chunks(teacher, student, text: str) -> None:
    data = text.encode("utf-8")
    te, se = teacher.encode(text), student.encode(text)
    al = align_spans(te.spans, se.spans)
    # Chunks partition the content bytes, in order.
    assert al.chunk_bytes[0, 0] == 0 and al.chunk_bytes[-1, 1] == len(data)
    assert (al.chunk_bytes[1:, 0] == al.chunk_bytes[:-1, 1]).all()
    assert (al.chunk_bytes[:, 1] > al.chunk_bytes[:, 0]).all()
    assert al.unaligned_bytes.tolist() == [0]
    for side_chunk, spans, first, count in (
        (al.teacher_chunk[0], te.spans, al.teacher_first, al.teacher_count),
        (al.student_chunk[0], se.spans, al.student_first, al.student_count),
    ):
        content = spans[:, 1] > spans[:, 0]
        # Every content token is in exactly one chunk; chunk ids never decrease along the tokens.
        assert (side_chunk[content] >= 0).all() and (side_chunk[~content] == -1).all()
        assert (np.diff(side_chunk[content]) >= 0).all()
        # Each chunk's tokens are one contiguous run that covers exactly the chunk's bytes.
        for c in range(al.num_chunks):
            members = np.flatnonzero(side_chunk == c)
            assert members.tolist() == list(range(first[c], first[c] + count[c]))
            assert spans[members[0], 0] == al.chunk_bytes[c, 0] and spans[members[-1], 1] == al.chunk_bytes[c, 1]


@pytest.mark.parametrize("name", ["qwen", "llama", "mistral", "gpt2"])
def test_spans_reproduce_text(request, name):
    view = request.getfixturevalue(name)

    @SETTINGS
    @given(TEXTS)
    def run(text):
        check_spans(view, text)

    run()


@pytest.mark.parametrize("teacher,student", PAIRS)
def test_chunk_invariants(request, teacher, student):
    t, s = request.getfixturevalue(teacher), request.getfixturevalue(student)

    @SETTINGS
    @given(TEXTS)
    def run(text):
        check_chunks(t, s, text)
        check_chunks(s, t, text)

    run()


@pytest.mark.parametrize("name", ["qwen", "mistral", "gpt2", "llama"])
def test_same_tokenizer_gives_one_token_per_chunk(request, name):
    view = request.getfixturevalue(name)

    @SETTINGS
    @given(TEXTS)
    def run(text):
        enc = view.encode(text)
        al = align_spans(enc.spans, enc.spans)
        content = enc.spans[:, 1] > enc.spans[:, 0]
        assert al.num_chunks == int(content.sum())
        assert (al.teacher_count == 1).all() and (al.student_count == 1).all()
        assert (al.teacher_first == al.student_first).all()

    run()


def test_batched_equals_one_by_one(qwen, mistral):
    @SETTINGS
    @given(st.lists(TEXTS, min_size=1, max_size=4))
    def run(texts):
        te = [qwen.encode(t) for t in texts]
        se = [mistral.encode(t) for t in texts]
        batched = align_spans([e.spans for e in te], [e.spans for e in se])
        offset = 0
        for b, (a, c) in enumerate(zip(te, se)):
            single = align_spans(a.spans, c.spans)
            sel = batched.chunk_sample == b
            assert (batched.chunk_bytes[sel] == single.chunk_bytes).all()
            assert (batched.teacher_first[sel] == single.teacher_first).all()
            assert (batched.student_count[sel] == single.student_count).all()
            own = batched.teacher_chunk[b, : len(a)]
            assert ((own >= 0) == (single.teacher_chunk[0] >= 0)).all()
            assert (own[own >= 0] - offset == single.teacher_chunk[0][own >= 0]).all()
            offset += single.num_chunks

    run()


@pytest.mark.parametrize("name", ["qwen", "llama", "mistral", "gpt2"])
def test_fast_spans_equal_offset_spans(request, name):
    """The running-sum fast path and the offsets path give identical spans wherever the fast path applies."""
    view = request.getfixturevalue(name)
    assert view._byte_exact_mode is not None
    used = []

    @SETTINGS
    @given(TEXTS)
    def run(text):
        enc = view.backend.encode(text)
        ids = np.array(enc.ids, dtype=np.int64)
        fast = view._fast_spans(text, ids)
        if fast is not None:
            used.append(1)
            assert (fast == view._encoding_from_offsets(text, enc, ids).spans).all()

    run()
    assert used, "the fast path never applied"
