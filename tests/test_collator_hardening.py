"""Collator and span-alignment hardening: student labels, template seams, one-sided messages, byte accounting,
bad spans, template errors, huge offsets, fingerprints, empty content. Real tokenizers, offline."""

from __future__ import annotations

import random
import tracemalloc
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xtok_kd.assets import SAMPLE_TEXT
from xtok_kd.data import CrossTokenizerCollator, render_chat
from xtok_kd.sequence import align_spans
from xtok_kd.sequence.spans import _align_batch, _align_compressed, pad_spans
from xtok_kd.tokenizer import load_tokenizer

TWO_TURNS = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}]


def content_coordinates(messages) -> bytes:
    """The bytes of the collator's content coordinates: contents joined by a one-byte separator."""
    return b"\x00".join(m["content"].encode("utf-8") for m in messages)


def collate(collator, examples):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = collator(examples)
    return out, [str(w.message) for w in caught]


# ---------------------------------------------------------------- 3: student labels do not depend on the teacher
def test_student_labels_ignore_teacher_truncation(mistral, llama):
    text = SAMPLE_TEXT.read_text(encoding="utf-8")[:6000]
    out = CrossTokenizerCollator(mistral, llama, max_length=256)([{"text": text}])
    labels, ids = out["student_labels"][0].numpy(), out["student_input_ids"][0].numpy()
    al = out["alignment"]
    # The teacher (Mistral, shorter tokens) covers fewer bytes: many student tokens are in no chunk ...
    assert (al.student_chunk[0] >= 0).sum() < 230
    # ... but every student content token (all but Llama's BOS) keeps its label.
    assert (labels >= 0).sum() == 255 and labels[0] == -100
    assert (labels[1:] == ids[1:]).all()
    # The same student with itself as teacher gives the very same labels.
    same = CrossTokenizerCollator(llama, llama, max_length=256)([{"text": text}])["student_labels"]
    assert (same[0].numpy() == labels).all()


@pytest.mark.parametrize("loss_on", ["all", "assistant"])
def test_chat_labels_follow_student_text_and_loss_on_only(qwen, llama, loss_on):
    messages = [{"role": "user", "content": "Hello there"}, {"role": "function", "content": "lookup result 7"},
                {"role": "assistant", "content": "The answer is 7."}]
    outs = [collate(CrossTokenizerCollator(t, llama, loss_on=loss_on, teacher_max_length=m),
                    [{"messages": messages}])[0] for t, m in ((qwen, None), (llama, None), (qwen, 20))]
    labels = [o["student_labels"][0].numpy() for o in outs]
    assert (labels[0] == labels[1]).all() and (labels[0] == labels[2]).all()
    decoded = llama.hf.decode([int(i) for i in labels[0] if i >= 0])
    assert "The answer is 7." in decoded
    assert ("Hello there" in decoded) == (loss_on == "all")
    assert ("lookup result 7" in decoded) == (loss_on == "all")  # Qwen drops it; the student's labels keep it
    # Template tokens, including the end-of-turn marker after the answer, are not labelled.
    assert 128009 not in labels[0] and 128006 not in labels[0]  # <|eot_id|>, <|start_header_id|>


# ---------------------------------------------------------------- 5: a token straddling template and content
def test_qwen_newline_seam_is_in_no_chunk(qwen, mistral):
    messages = [{"role": "user", "content": "\n\nHello"}, {"role": "assistant", "content": "\n\nWorld!"}]
    out = CrossTokenizerCollator(qwen, mistral)([{"messages": messages}])
    al = out["alignment"]
    t_ids = out["teacher_input_ids"][0].numpy()
    merged = qwen.hf.convert_tokens_to_ids("ĊĊĊ")  # template "\n" + content "\n\n" in one Qwen token
    assert (t_ids == merged).sum() == 2
    assert (al.teacher_chunk[0][t_ids == merged] == -1).all()
    assert out["seam_tokens"] >= 2
    # No chunk holds the leading newlines: they are reported as unaligned.
    data = content_coordinates(messages)
    assert all(b"\n\n" not in data[a:b] for a, b in al.chunk_bytes.tolist())
    assert al.unaligned_bytes[0] >= 4


FRAGMENTS = ["Hello", " world", "\n\n", "\n", "  ", "def f(x):\n    return x", "你好", "🤷‍♂️", "12+30=42",
             "don't", " [INST] ", "<b>", "é", "\t", "ok.", "?", "\n\nSure", "Answer:", " "]


def random_chat(rng: random.Random, *, system: bool) -> list[dict]:
    def content() -> str:
        return "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, 5)))

    messages = [{"role": "system", "content": content()}] if system and rng.random() < 0.4 else []
    for turn in range(rng.randint(1, 3)):
        messages.append({"role": "user", "content": content()})
        messages.append({"role": "assistant", "content": content()})
    return messages


def check_chat(collator, messages) -> tuple[int, int]:
    """Every chunk has equal bytes on both sides (in the rendered texts and in content coordinates), and no
    token whose rendered range crosses a template/content edge is in a chunk. Returns (chunks, seam tokens)."""
    out, _ = collate(collator, [{"messages": messages}])
    al = out["alignment"]
    data = content_coordinates(messages)
    sides = []
    for view, name, chunk_of in ((collator.teacher, "teacher", al.teacher_chunk[0]),
                                 (collator.student, "student", al.student_chunk[0])):
        rendered, regions = render_chat(view, messages, side=name)
        enc = view.encode(rendered, add_special_tokens=False)
        raw = rendered.encode("utf-8")
        cb = [len(rendered[:i].encode("utf-8")) for i in range(len(rendered) + 1)]
        edges = [cb[r.char_start + d] for r in regions if r.status == "kept" and r.char_len for d in (0, r.char_len)]
        n = len(enc.ids)
        assert (out[f"{name}_input_ids"][0].numpy()[:n] == enc.ids).all()
        for i in np.flatnonzero(chunk_of[:n] >= 0):
            a, b = enc.spans[i]
            assert not any(a < e < b for e in edges), f"{name} token {i} straddles a content edge but is in a chunk"
        sides.append((enc, raw, chunk_of))
    for c in range(al.num_chunks):
        lo, hi = al.chunk_bytes[c]
        expected = data[lo:hi]
        assert b"\x00" not in expected  # never across a message separator
        for enc, raw, chunk_of in sides:
            members = np.flatnonzero(chunk_of == c)
            assert raw[enc.spans[members[0], 0]:enc.spans[members[-1], 1]] == expected
    assert al.unaligned_bytes[0] + al.aligned_bytes == al.covered_bytes[0] <= len(data) - (len(messages) - 1)
    return al.num_chunks, out["seam_tokens"]


@pytest.mark.parametrize("teacher,student", [("qwen", "mistral"), ("qwen", "llama"), ("mistral", "llama"),
                                             ("llama", "qwen")])
def test_random_chats_chunks_have_equal_bytes_and_no_seam_token(request, teacher, student):
    t, s = request.getfixturevalue(teacher), request.getfixturevalue(student)
    collator = CrossTokenizerCollator(t, s)
    rng = random.Random(f"{teacher}-{student}")
    chunks = seams = 0
    for _ in range(25):
        c, m = check_chat(collator, random_chat(rng, system="mistral" not in (teacher, student)))
        chunks, seams = chunks + c, seams + m
    assert chunks > 300 and seams > 0  # the check ran on real chunks, and seams did occur


# ---------------------------------------------------------------- 7: a message only one side's template renders
def test_message_dropped_by_teacher_is_counted_unaligned_and_warned(qwen, llama):
    messages = [{"role": "user", "content": "Look it up"}, {"role": "function", "content": "Look it up again"},
                {"role": "assistant", "content": "Look it up again"}]
    out, caught = collate(CrossTokenizerCollator(qwen, llama), [{"messages": messages}])
    al = out["alignment"]
    assert out["dropped_messages"] == 1
    assert any("'function'" in w and "teacher" in w and "qwen2.5" in w and "Fix:" in w for w in caught)
    data = content_coordinates(messages)
    lo = len(messages[0]["content"]) + 1
    hi = lo + len(messages[1]["content"])
    # No chunk inside the dropped message; its bytes are unaligned, not paired with the identical next message.
    assert not any(a < hi and b > lo for a, b in al.chunk_bytes.tolist())
    assert al.unaligned_bytes[0] == hi - lo
    assert al.aligned_bytes == len(messages[0]["content"]) + len(messages[2]["content"])
    assert all(data[a:b] in (b"Look", b" it", b" up", b" again") for a, b in al.chunk_bytes.tolist())


def test_tool_message_rewritten_by_one_template_is_one_sided(qwen, llama):
    # Llama JSON-quotes tool content ("\"x\"" becomes "\\\"x\\\""); Qwen keeps it in a <tool_response>.
    messages = [{"role": "user", "content": "Call it"}, {"role": "tool", "content": 'Result: "42"\nDone'},
                {"role": "assistant", "content": "It is 42."}]
    out, caught = collate(CrossTokenizerCollator(qwen, llama), [{"messages": messages}])
    assert out["dropped_messages"] == 1
    assert any("'tool'" in w and "rewritten" in w and "student" in w for w in caught)
    lo = len(messages[0]["content"]) + 1
    hi = lo + len(messages[1]["content"].encode())
    al = out["alignment"]
    assert not any(a < hi and b > lo for a, b in al.chunk_bytes.tolist())
    assert al.unaligned_bytes[0] == hi - lo


def test_system_message_dropped_by_one_template(qwen):
    student = load_tokenizer("qwen2.5")
    student.hf.chat_template = ("{% for m in messages %}{% if m.role != 'system' %}<|im_start|>{{ m.role }}\n"
                                "{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}")
    messages = [{"role": "system", "content": "Be brief."}, *TWO_TURNS]
    out, caught = collate(CrossTokenizerCollator(qwen, student), [{"messages": messages}])
    assert out["dropped_messages"] == 1 and any("'system'" in w and "student" in w for w in caught)
    al = out["alignment"]
    assert al.unaligned_bytes[0] == len("Be brief.")
    assert al.aligned_bytes == sum(len(m["content"]) for m in TWO_TURNS)


def test_message_dropped_by_both_sides_is_simply_absent(qwen):
    messages = [TWO_TURNS[0], {"role": "function", "content": "ignored by both"}, TWO_TURNS[1]]
    out, caught = collate(CrossTokenizerCollator(qwen, qwen), [{"messages": messages}])
    assert out["dropped_messages"] == 0 and not caught
    al = out["alignment"]
    assert al.aligned_share == 1.0 and al.unaligned_bytes.tolist() == [0] and al.truncated_bytes.tolist() == [0]
    assert al.covered_bytes[0] == sum(len(m["content"]) for m in TWO_TURNS)


# ---------------------------------------------------------------- 9: byte accounting
@pytest.mark.parametrize("student_name", ["qwen", "llama"])
def test_perfectly_aligned_chat_reports_full_share(request, qwen, student_name):
    student = request.getfixturevalue(student_name)
    out = CrossTokenizerCollator(qwen, student)([{"messages": TWO_TURNS}, {"messages": TWO_TURNS[:1]}])
    al = out["alignment"]
    sizes = [sum(len(m["content"]) for m in TWO_TURNS), len(TWO_TURNS[0]["content"])]
    assert al.covered_bytes.tolist() == sizes  # the separator between the two messages is not content
    assert al.unaligned_bytes.tolist() == [0, 0]
    assert al.aligned_share == 1.0 and al.summary()["aligned_share"] == 1.0


def test_example_truncated_to_nothing_is_reported_and_warned(qwen, llama):
    col = CrossTokenizerCollator(qwen, llama, max_length=4)
    out, caught = collate(col, [{"messages": TWO_TURNS}, {"text": "Hi"}])
    al = out["alignment"]
    content = sum(len(m["content"]) for m in TWO_TURNS)
    assert out["truncated_examples"] == 1
    assert al.truncated_bytes.tolist() == [content, 0]
    assert al.summary()["truncated_bytes"] == content
    assert not (al.chunk_sample == 0).any()
    assert any("example 0" in w and "max_length=4" in w and "raise max_length" in w for w in caught)
    # One side truncated to nothing, the other not: its bytes are covered by one side, all unaligned.
    out, caught = collate(CrossTokenizerCollator(qwen, llama, student_max_length=1), [{"text": "Hello world"}])
    al = out["alignment"]
    assert out["truncated_examples"] == 1 and al.num_chunks == 0
    assert al.unaligned_bytes.tolist() == [11] and al.covered_bytes.tolist() == [11]
    assert any("the student kept none" in w for w in caught)


def test_both_sides_truncated_bytes_are_counted(qwen, mistral):
    text = "word " * 100
    al = CrossTokenizerCollator(qwen, mistral, max_length=10)([{"text": text}])["alignment"]
    assert al.truncated_bytes[0] > 0
    assert al.truncated_bytes[0] + al.covered_bytes[0] == len(text)
    assert al.aligned_bytes + al.unaligned_bytes[0] == al.covered_bytes[0]


def test_typed_special_token_at_the_end_is_unaligned_not_truncated(qwen, gpt2):
    text = "ab <|endoftext|>"  # a control token on both sides: no side covers its 13 bytes
    al = CrossTokenizerCollator(qwen, gpt2)([{"text": text}])["alignment"]
    assert al.truncated_bytes.tolist() == [0] and al.covered_bytes.tolist() == [len(text)]
    assert al.unaligned_bytes[0] >= 13 and al.aligned_bytes + al.unaligned_bytes[0] == len(text)


# ---------------------------------------------------------------- 11: non-integer spans
@pytest.mark.parametrize("bad,what", [(0.5, "fractional"), (float("nan"), "NaN"), (float("inf"), "infinite"),
                                      (-float("inf"), "infinite")])
def test_non_integer_spans_are_refused(bad, what):
    t = np.array([[0.0, 2.0], [2.0, bad]])
    with pytest.raises(ValueError, match=rf"teacher_spans\[1, 1\] = .* is {what}.*integer"):
        align_spans(t, np.array([[0, 4]]))
    with pytest.raises(ValueError, match=rf"student_spans\[0\]\[1, 1\] = .* is {what}"):
        align_spans([np.array([[0, 4]])], [t])


def test_integral_float_and_torch_spans_are_accepted():
    import torch

    t, s = np.array([[0, 0], [0, 3], [3, 5]]), np.array([[0, 2], [2, 5]])
    ref = align_spans(t, s)
    for tt, ss in ((t.astype(np.float32), s.astype(np.float64)),
                   (torch.tensor(t), torch.tensor(s, dtype=torch.float32)),
                   (t.astype(np.uint16), s.astype(np.int32))):
        al = align_spans(tt, ss)
        assert (al.chunk_bytes == ref.chunk_bytes).all() and (al.teacher_chunk == ref.teacher_chunk).all()
    with pytest.raises(ValueError, match=r"teacher_spans\[0, 1\] = 2.5 is fractional"):
        align_spans(torch.tensor([[0.0, 2.5]]), s)
    with pytest.raises(ValueError, match="dtype (bool|object)"):
        align_spans(np.array([[True, False]]), s)


# ---------------------------------------------------------------- 18: a template that rejects the conversation
def test_template_rejection_names_side_tokenizer_and_fix(qwen, mistral):
    messages = [{"role": "system", "content": "Be brief."}, *TWO_TURNS]
    with pytest.raises(ValueError) as err:
        CrossTokenizerCollator(qwen, mistral)([{"messages": messages}])
    text = str(err.value)
    assert "student" in text and "mistral" in text and "Conversation roles must alternate" in text
    assert "merge the 'system' turn" in text and "example 0" in text
    with pytest.raises(ValueError, match=r"teacher tokenizer '[^']*mistral'.*Only user and assistant.*'tool'"):
        CrossTokenizerCollator(mistral, qwen)([{"messages": [TWO_TURNS[0], {"role": "tool", "content": "x"}]}])


# ---------------------------------------------------------------- 19: memory bounded by tokens, not offsets
def test_huge_offsets_use_memory_bounded_by_tokens():
    t = np.array([[0, 0], [0, 3], [3, 5], [5, 9]]) * 10**11
    s = np.array([[0, 2], [2, 3], [3, 4]]) * 10**11
    small = align_spans(t // 10**11, s // 10**11)
    tracemalloc.start()
    try:
        big = align_spans(t, s)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    assert (big.chunk_bytes == small.chunk_bytes * 10**11).all()
    assert (big.teacher_chunk == small.teacher_chunk).all() and (big.student_chunk == small.student_chunk).all()
    assert big.unaligned_bytes.tolist() == [6 * 10**11] and big.covered_bytes.tolist() == [9 * 10**11]
    # A tiled batch at offsets near 10**12 takes the compressed path too.
    tiled = align_spans([np.array([[10**12, 10**12 + 5], [10**12 + 5, 10**12 + 9]])] * 2,
                        [np.array([[10**12, 10**12 + 9]])] * 2)
    assert tiled.chunk_bytes.tolist() == [[10**12, 10**12 + 9]] * 2 and tiled.unaligned_bytes.tolist() == [0, 0]
    with pytest.raises(ValueError, match=r"\[100000000000, 300000000000\] overlaps an earlier token"):
        align_spans(np.array([[0, 2], [1, 3]]) * 10**11, np.array([[0, 3]]) * 10**11)


@st.composite
def span_lists(draw):
    n_bytes = draw(st.integers(1, 30))
    cuts = sorted(draw(st.sets(st.integers(1, n_bytes - 1), max_size=n_bytes)) if n_bytes > 1 else set())
    edges = [0, *cuts, n_bytes]
    spans = [[a, b] for a, b in zip(edges, edges[1:])]
    if draw(st.booleans()) and len(spans) > 1:
        del spans[draw(st.integers(0, len(spans) - 1))]
    if draw(st.booleans()):
        spans = spans[: draw(st.integers(0, len(spans)))]
    if draw(st.booleans()):
        spans = [[0, 0], *spans]
    return np.array(spans, dtype=np.int64).reshape(-1, 2)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(span_lists(), span_lists()), min_size=1, max_size=3), st.integers(1, 10**9))
def test_compressed_path_equals_dense_path(pairs, scale):
    t = pad_spans([p[0] * scale for p in pairs])
    s = pad_spans([p[1] * scale for p in pairs])
    dense = _align_batch(pad_spans([p[0] for p in pairs]), pad_spans([p[1] for p in pairs]))
    comp = _align_compressed(t, s)
    assert (comp.chunk_bytes == dense.chunk_bytes * scale).all()
    assert (comp.chunk_sample == dense.chunk_sample).all()
    for name in ("teacher_chunk", "student_chunk", "teacher_first", "student_first", "teacher_count",
                 "student_count"):
        assert (getattr(comp, name) == getattr(dense, name)).all(), name
    assert (comp.covered_bytes == dense.covered_bytes * scale).all()
    assert (comp.unaligned_bytes == dense.unaligned_bytes * scale).all()


# ---------------------------------------------------------------- 4: fingerprints
def test_fingerprints_travel_with_alignment_and_batch(qwen, mistral):
    out = CrossTokenizerCollator(qwen, mistral, loss_on="assistant")([{"messages": TWO_TURNS}])
    al = out["alignment"]
    assert out["teacher_fingerprint"] == al.teacher_fingerprint == qwen.fingerprint
    assert out["student_fingerprint"] == al.student_fingerprint == mistral.fingerprint
    assert qwen.fingerprint != mistral.fingerprint
    kept = al.with_loss_mask(np.ones(al.num_chunks, dtype=bool))
    assert (kept.teacher_fingerprint, kept.student_fingerprint) == (qwen.fingerprint, mistral.fingerprint)
    bare = align_spans(np.array([[0, 2]]), np.array([[0, 2]]))
    assert bare.teacher_fingerprint is None and bare.student_fingerprint is None
    assert bare.truncated_bytes is None and bare.summary()["truncated_bytes"] == 0.0  # unknown to align_spans


# ---------------------------------------------------------------- empty text and empty message content
def test_empty_text_and_empty_message_content(qwen, llama):
    col = CrossTokenizerCollator(qwen, llama)
    out, caught = collate(col, [{"text": ""}, {"text": "Hi there"}])
    al = out["alignment"]
    assert not (al.chunk_sample == 0).any() and (al.chunk_sample == 1).sum() == 2
    assert (out["student_labels"][0].numpy() == -100).all()
    assert al.covered_bytes.tolist() == [0, 8] and al.truncated_bytes.tolist() == [0, 0]
    assert out["truncated_examples"] == 0 and not caught
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""},
                {"role": "user", "content": ""}, {"role": "assistant", "content": "Bye"}]
    for teacher in (qwen, llama):
        out, caught = collate(CrossTokenizerCollator(teacher, llama), [{"messages": messages}])
        al = out["alignment"]
        assert al.chunk_bytes[0].tolist() == [0, 2] and al.chunk_bytes[-1].tolist()[1] == 8
        assert al.aligned_bytes == 5 and al.chunk_bytes[1, 0] == 5  # "Bye" after three separators
        assert al.aligned_share == 1.0 and out["dropped_messages"] == 0 and not caught


def test_seam_tokens_keep_their_student_label(qwen, mistral):
    """A token straddling template and content is in no chunk, but it is the student's own text: it keeps its
    label when the content it overlaps counts (Mistral's first answer word, Qwen's template '\\n' merged with '\\n\\n')."""
    messages = [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "It is four."},
                {"role": "user", "content": "\n\nAnd three?"}, {"role": "assistant", "content": "\n\nSix."}]
    for teacher, student, expected in ((qwen, mistral, "It is four.\n\nSix."), (mistral, qwen, "It is four.\n\n\nSix.")):
        out = CrossTokenizerCollator(teacher, student, loss_on="assistant")([{"messages": messages}])
        labels = out["student_labels"][0]
        assert student.hf.decode([int(i) for i in labels if i >= 0]) == expected
        al = out["alignment"]
        seam = (al.student_chunk[0] < 0) & (labels.numpy() >= 0)  # labelled, yet in no chunk: the seam tokens
        assert 1 <= int(seam.sum()) <= out["seam_tokens"]
    # The same conversation with loss_on="all" labels the user turns' seam tokens too.
    out = CrossTokenizerCollator(qwen, mistral, loss_on="all")([{"messages": messages}])
    decoded = mistral.hf.decode([int(i) for i in out["student_labels"][0] if i >= 0])
    assert decoded.startswith("What is two plus two?")
