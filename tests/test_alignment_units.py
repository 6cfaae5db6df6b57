"""Named unit cases: alignment edge cases, bad input, edit-distance alignment, and a brute-force oracle."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import xtok_kd
from xtok_kd.sequence import align_spans, align_tokens, dtw_path
from xtok_kd.tokenizer import TokenizerView, load_tokenizer


def brute_force_chunks(t_spans, s_spans):
    """Slow oracle: chunks from Python sets of boundaries (one sample)."""
    t = [(a, b) for a, b in t_spans if b > a]
    s = [(a, b) for a, b in s_spans if b > a]
    tb = {x for ab in t for x in ab}
    sb = {x for ab in s for x in ab}
    common = sorted(tb & sb)
    chunks = []
    for lo, hi in zip(common, common[1:]):
        tin = [ab for ab in t if lo <= ab[0] and ab[1] <= hi]
        sin = [ab for ab in s if lo <= ab[0] and ab[1] <= hi]
        if sum(b - a for a, b in tin) == hi - lo and sum(b - a for a, b in sin) == hi - lo:
            chunks.append((lo, hi))
    return chunks


@st.composite
def span_lists(draw):
    """Random tokenizations of a random byte range, with gaps, empty spans and truncation."""
    n_bytes = draw(st.integers(1, 40))
    cuts = sorted(draw(st.sets(st.integers(1, n_bytes - 1), max_size=n_bytes)) if n_bytes > 1 else set())
    edges = [0, *cuts, n_bytes]
    spans = [[a, b] for a, b in zip(edges, edges[1:])]
    if draw(st.booleans()) and len(spans) > 1:  # a gap: drop one token
        del spans[draw(st.integers(0, len(spans) - 1))]
    if draw(st.booleans()):  # truncation
        spans = spans[: draw(st.integers(0, len(spans)))]
    if draw(st.booleans()):  # a BOS
        spans = [[0, 0], *spans]
    return np.array(spans, dtype=np.int64).reshape(-1, 2)


@settings(max_examples=400, deadline=None)
@given(span_lists(), span_lists())
def test_matches_brute_force(t, s):
    al = align_spans(t, s)
    assert [tuple(c) for c in al.chunk_bytes.tolist()] == brute_force_chunks(t.tolist(), s.tolist())
    covered = {x for a, b in [*t.tolist(), *s.tolist()] for x in range(a, b)}
    if covered:
        assert al.covered_bytes[0] == max(covered) + 1 - min(covered)
    assert al.unaligned_bytes[0] == al.covered_bytes[0] - al.aligned_bytes


def test_one_sided_bos_and_truncation():
    teacher = np.array([[0, 0], [0, 3], [3, 5], [5, 9]])  # BOS + 3 tokens
    student = np.array([[0, 2], [2, 3], [3, 4]])  # no BOS, covers only 4 bytes
    al = align_spans(teacher, student)
    assert al.chunk_bytes.tolist() == [[0, 3]]
    assert al.teacher_chunk.tolist() == [[-1, 0, -1, -1]]
    assert al.student_chunk.tolist() == [[0, 0, -1]]
    assert al.unaligned_bytes.tolist() == [6]  # bytes 3..9: never paired
    # Student has no BOS: its first chunk has no aligned row, and is dropped and counted.
    assert al.has_rows.tolist() == [False] and al.dropped_chunks == 1
    assert len(al.rows()) == 0


def test_padding_and_template_tokens_are_in_no_chunk():
    teacher = np.array([[[0, 0], [0, 2], [2, 4], [4, 4], [4, 4]]])  # marker, 2 tokens, 2 pads
    student = np.array([[[0, 0], [0, 0], [0, 4], [4, 4]]])
    al = align_spans(teacher, student)
    assert al.teacher_chunk.tolist() == [[-1, 0, 0, -1, -1]]
    assert al.student_chunk.tolist() == [[-1, -1, 0, -1]]
    rows = al.rows()
    assert rows.teacher_row.tolist() == [0] and rows.student_row.tolist() == [1]
    assert rows.teacher_count.tolist() == [2] and rows.student_count.tolist() == [1]


def test_batch_size_mismatch():
    with pytest.raises(ValueError, match="batch size mismatch: 2 teacher sequences but 1 student"):
        align_spans([np.array([[0, 1]]), np.array([[0, 1]])], [np.array([[0, 1]])])


def test_overlapping_spans_rejected():
    with pytest.raises(ValueError, match="overlaps an earlier token"):
        align_spans(np.array([[0, 3], [2, 4]]), np.array([[0, 4]]))
    with pytest.raises(ValueError, match="end < start"):
        align_spans(np.array([[3, 1]]), np.array([[0, 4]]))


def test_empty_alignment_is_valid():
    al = align_spans(np.zeros((0, 2), dtype=np.int64), np.zeros((0, 2), dtype=np.int64))
    assert al.num_chunks == 0 and al.aligned_share == 0.0
    assert len(al.rows()) == 0


def test_empty_text_gives_no_chunk(qwen, mistral):
    te, se = qwen.encode(""), mistral.encode("")
    assert te.ids.tolist() == [] and se.ids.tolist() == [1] and not se.spans.any()
    assert align_spans(te.spans, se.spans).num_chunks == 0


def test_special_tokens_only_gives_no_chunk(qwen, mistral):
    te, se = qwen.encode("<|im_start|><|im_end|>"), mistral.encode("<s></s>")
    assert te.special_in_text == 2 and te.uncovered_bytes == 22 and (te.spans[:, 0] == te.spans[:, 1]).all()
    assert se.special_in_text == 2 and se.uncovered_bytes == 7 and (se.spans[:, 0] == se.spans[:, 1]).all()
    assert align_spans(te.spans, te.spans).num_chunks == 0 and align_spans(se.spans, se.spans).num_chunks == 0


def test_special_token_in_text_is_never_paired(qwen, llama):
    text = "hi <|im_end|> there"
    te, se = qwen.encode(text), llama.encode(text)
    assert te.special_in_text == 1 and te.uncovered_bytes == len("<|im_end|>")
    al = align_spans(te.spans, se.spans)
    # Llama spells the marker as ordinary tokens; those bytes are reported, not paired with anything.
    assert al.unaligned_bytes[0] >= len("<|im_end|>")
    assert not any(a < 13 and b > 3 for a, b in al.chunk_bytes.tolist())


def test_nfc_normaliser_spans_cover_original_bytes(qwen):
    text = "cafe\u0301 e\u0301te\u0301"  # decomposed accents; Qwen normalises to NFC
    enc = qwen.encode(text)
    data = text.encode("utf-8")
    assert enc.uncovered_bytes == 0
    assert b"".join(data[a:b] for a, b in enc.spans) == data


def test_sentencepiece_prefix_space_gets_empty_span(mistral):
    enc = mistral.encode(" lead")
    assert enc.spans.tolist()[-1] == [0, 5]
    assert [mistral.token_bytes(int(i)) for i in enc.ids][-1] == b" lead"


def _wordpiece_view():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return TokenizerView(PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]"), name="tiny-wordlevel")


def test_lossy_tokenizer_reports_unknown_tokens():
    view = _wordpiece_view()
    enc = view.encode("hello 🙂 world")
    assert enc.unknown_tokens == 1
    # Spans still cover exactly the bytes the <unk> replaced, so alignment stays byte-exact.
    assert enc.spans.tolist() == [[0, 5], [6, 10], [11, 16]]
    assert enc.uncovered_bytes == 2  # the spaces the pre-tokenizer drops are reported


def test_tokenizer_without_offsets_is_refused():
    class Slow:
        def encode(self, text):
            return [1, 2]

    with pytest.raises(ValueError, match="no fast backend"):
        load_tokenizer(Slow())


def test_load_tokenizer_bad_path():
    with pytest.raises(ValueError, match="could not load tokenizer"):
        load_tokenizer("/nonexistent/tokenizer/folder")


def test_fingerprint_and_token_bytes(qwen, llama, mistral, gpt2):
    assert qwen.encode("Hello world").ids.tolist() == [9707, 1879]
    assert llama.encode("Hello world").ids.tolist() == [128000, 9906, 1917]
    assert mistral.encode("Hello world").ids.tolist() == [1, 22557, 1526]
    assert gpt2.encode("Hello world").ids.tolist() == [15496, 995]
    assert qwen.token_bytes(1879) == b" world" == llama.token_bytes(1917) == mistral.token_bytes(1526)
    assert mistral.token_bytes(mistral.backend.token_to_id("<0x0A>")) == b"\n"
    assert len({v.fingerprint for v in (qwen, llama, mistral, gpt2)}) == 4
    assert load_tokenizer(qwen.hf).fingerprint == qwen.fingerprint
    with pytest.raises(IndexError, match="outside this vocabulary"):
        qwen.token_bytes(10**7)


def test_public_api_is_lazy():
    assert "align_spans" in dir(xtok_kd)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        xtok_kd.nope  # noqa: B018


# ------------------------------------------------------------------ edit-distance alignment


def brute_force_dtw(cost):
    n, m = cost.shape
    acc = np.full((n + 1, m + 1), np.inf)
    acc[0, 0] = 0
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            acc[i, j] = cost[i - 1, j - 1] + min(acc[i - 1, j], acc[i, j - 1], acc[i - 1, j - 1])
    return acc[n, m]


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 9), st.integers(1, 9), st.integers(0, 2**31))
def test_dtw_path_is_optimal(n, m, seed):
    cost = np.random.default_rng(seed).random((n, m))
    path = dtw_path(cost)
    assert tuple(path[0]) == (0, 0) and tuple(path[-1]) == (n - 1, m - 1)
    steps = np.diff(path, axis=0)
    assert ((steps >= 0) & (steps <= 1)).all() and (steps.sum(axis=1) >= 1).all()
    assert np.isclose(cost[path[:, 0], path[:, 1]].sum(), brute_force_dtw(cost))


def test_align_tokens_agrees_with_spans_on_identical_text(qwen, mistral):
    text = "The year 2024 was great; def f(x):\n    return x**2"
    te, se = qwen.encode(text), mistral.encode(text)
    by_spans = align_spans(te.spans, se.spans)
    al = align_tokens([qwen.token_bytes(int(i)) for i in te.ids], [mistral.token_bytes(int(i)) for i in se.ids[1:]],
                      student_offset=1)
    assert al.teacher_chunk.shape == (1, len(te)) and al.student_chunk.shape == (1, len(se))
    assert al.student_chunk[0, 0] == -1  # the BOS before the given tokens
    # Every token is in a chunk, chunks are contiguous runs, and most chunks match the byte-exact ones.
    assert (al.teacher_chunk[0] >= 0).all() and (al.student_chunk[0, 1:] >= 0).all()
    assert (np.diff(al.teacher_chunk[0]) >= 0).all()
    exact = {tuple(c) for c in by_spans.chunk_bytes.tolist()}
    agree = sum(tuple(c) in exact for c in al.chunk_bytes.tolist())
    assert agree >= 0.8 * by_spans.num_chunks


def test_align_tokens_entropy_weighting_and_errors():
    t = [b"ab", b"c"]
    s = [b"a", b"bc"]
    al = align_tokens(t, s, teacher_entropy=[0.0, 0.0], student_entropy=[0.0, 3.0], entropy_weight=1.0)
    assert al.num_chunks >= 1 and al.teacher_count.sum() == 2 and al.student_count.sum() == 2
    with pytest.raises(ValueError, match="pass both"):
        align_tokens(t, s, teacher_entropy=[0.0, 0.0])
    with pytest.raises(ValueError, match="tokens on both sides"):
        align_tokens([], s)
    with pytest.raises(ValueError, match="entropies must have shapes"):
        align_tokens(t, s, teacher_entropy=[0.0], student_entropy=[0.0, 1.0])


@settings(max_examples=300, deadline=None)
@given(span_lists(), span_lists())
def test_single_sample_fast_path_equals_general_path(t, s):
    from xtok_kd.sequence.spans import _align_batch
    from xtok_kd.sequence.tiled import align_one_tiled as _align_one

    fast = _align_one(t, s)
    if fast is None:
        return
    general = _align_batch(t[None], s[None])
    for field in ("teacher_chunk", "student_chunk", "chunk_sample", "chunk_bytes", "teacher_first", "student_first",
                  "teacher_count", "student_count", "covered_bytes", "unaligned_bytes"):
        assert np.array_equal(getattr(fast, field), getattr(general, field)), field


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(span_lists(), span_lists()), min_size=1, max_size=4))
def test_batched_fast_path_equals_general_path(pairs):
    from xtok_kd.sequence.spans import _align_batch, pad_spans
    from xtok_kd.sequence.tiled import align_tiled_batch as _align_tiled

    t = pad_spans([a for a, _ in pairs])
    s = pad_spans([b for _, b in pairs])
    fast = _align_tiled(t, s)
    if fast is None:
        return
    general = _align_batch(t, s)
    for field in ("teacher_chunk", "student_chunk", "chunk_sample", "chunk_bytes", "teacher_first", "student_first",
                  "teacher_count", "student_count", "covered_bytes", "unaligned_bytes"):
        assert np.array_equal(getattr(fast, field), getattr(general, field)), field
