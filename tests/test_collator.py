"""CrossTokenizerCollator: text and chat examples, own templates, assistant-only loss, truncation."""

from __future__ import annotations

import numpy as np
import pytest

from xtok_kd.data import CrossTokenizerCollator, render_chat

MESSAGES = [
    {"role": "user", "content": "What is 12+30? Answer with digits."},
    {"role": "assistant", "content": "It is 42. 🤷‍♂️ 你好"},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": "You're welcome!\n\ndef f(x):\n    return x"},
]


def chunk_bytes_on(view, ids, positions):
    return b"".join(view.token_bytes(int(ids[i])) for i in positions)


@pytest.mark.parametrize("student_name", ["llama", "mistral", "gpt2"])
def test_text_examples(request, qwen, student_name):
    student = request.getfixturevalue(student_name)
    texts = ["Hello there, general 12345!", "第一 line\n\tsecond 🤷‍♂️ line"]
    out = CrossTokenizerCollator(qwen, student)([{"text": t} for t in texts])
    al = out["alignment"]
    assert out["teacher_input_ids"].shape[0] == out["student_input_ids"].shape[0] == 2
    assert al.unaligned_bytes.tolist() == [0, 0]
    assert al.aligned_bytes == sum(len(t.encode()) for t in texts)
    # Padding positions carry no chunk and are masked out of attention.
    pad = out["student_attention_mask"].numpy() == 0
    assert (al.student_chunk[pad] == -1).all()
    # The labels are the input ids on content tokens, -100 elsewhere (BOS, padding).
    labels, ids = out["student_labels"].numpy(), out["student_input_ids"].numpy()
    assert ((labels == ids) == (al.student_chunk >= 0)).all()


@pytest.mark.parametrize("student_name", ["llama", "mistral"])
def test_chat_uses_each_sides_template_and_aligns_content_only(request, qwen, student_name):
    student = request.getfixturevalue(student_name)
    out = CrossTokenizerCollator(qwen, student)([{"messages": MESSAGES}])
    al = out["alignment"]
    t_ids, s_ids = out["teacher_input_ids"][0].numpy(), out["student_input_ids"][0].numpy()
    # Each side's own template markers appear in its ids, and no marker is in a chunk.
    assert 151644 in t_ids  # <|im_start|>
    marker = 128006 if student_name == "llama" else 1  # <|start_header_id|> / <s>
    assert marker in s_ids
    for ids, chunk in ((t_ids, al.teacher_chunk[0]), (s_ids, al.student_chunk[0])):
        assert (chunk[np.isin(ids, [151644, 151645, 128006, 128007, 128009, 1, 2])] == -1).all()
    # Content bytes: every message's content lies in content coordinates; chunks never cross messages.
    sizes = [len(m["content"].encode()) for m in MESSAGES]
    starts = np.concatenate(([0], np.cumsum(np.array(sizes) + 1)[:-1]))
    msg_of_start = np.searchsorted(starts, al.chunk_bytes[:, 0], side="right") - 1
    msg_of_end = np.searchsorted(starts, al.chunk_bytes[:, 1] - 1, side="right") - 1
    assert (msg_of_start == msg_of_end).all()
    assert al.aligned_bytes >= 0.9 * sum(sizes)
    # Wherever both sides' chunk tokens are whole content tokens, they spell the same bytes.
    same = 0
    for c in range(al.num_chunks):
        tr, sr = al.chunk_tokens(c)
        same += chunk_bytes_on(qwen, t_ids, tr).strip() == chunk_bytes_on(student, s_ids, sr).strip()
    assert same >= 0.9 * al.num_chunks


def test_assistant_only_loss_mask(qwen, llama):
    out = CrossTokenizerCollator(qwen, llama, loss_on="assistant")([{"messages": MESSAGES}])
    al = out["alignment"]
    sizes = [len(m["content"].encode()) for m in MESSAGES]
    starts = np.concatenate(([0], np.cumsum(np.array(sizes) + 1)[:-1]))
    msg = np.searchsorted(starts, al.chunk_bytes[:, 0], side="right") - 1
    roles = np.array([m["role"] for m in MESSAGES])[msg]
    assert (al.chunk_loss_mask == (roles == "assistant")).all()
    assert al.chunk_loss_mask.any() and not al.chunk_loss_mask.all()
    rows = al.rows(only_loss=True)
    assert len(rows) == int((al.chunk_loss_mask & al.has_rows).sum())
    # Student labels only on assistant content.
    labels = out["student_labels"][0].numpy()
    decoded = llama.hf.decode([int(i) for i in labels if i >= 0])
    assert "welcome" in decoded and "Thanks" not in decoded


def test_llama_trimmed_content_is_reported_not_paired(qwen, llama):
    messages = [{"role": "user", "content": "  padded question  "}, {"role": "assistant", "content": "ok"}]
    _, regions = render_chat(llama, messages)
    assert regions[0][2] == 2  # the Llama template trims: content starts 2 chars in
    al = CrossTokenizerCollator(qwen, llama)([{"messages": messages}])["alignment"]
    assert al.unaligned_bytes[0] >= 4  # the 4 trimmed spaces exist on the Qwen side only


def test_truncation_reports_uncovered_bytes(qwen, mistral):
    text = "word " * 50
    out = CrossTokenizerCollator(qwen, mistral, student_max_length=10)([{"text": text}])
    al = out["alignment"]
    assert out["student_input_ids"].shape[1] == 10
    assert al.unaligned_bytes[0] > 0
    assert al.aligned_bytes + al.unaligned_bytes[0] == len(text.encode())


def test_bad_examples(qwen, gpt2):
    col = CrossTokenizerCollator(qwen, gpt2)
    with pytest.raises(ValueError, match="exactly one of 'text' or 'messages'"):
        col([{"prompt": "x"}])
    with pytest.raises(ValueError, match="has no chat template"):
        col([{"messages": MESSAGES}])
    with pytest.raises(ValueError, match="empty batch"):
        col([])
    with pytest.raises(ValueError, match="loss_on='answers' is not one of"):
        CrossTokenizerCollator(qwen, gpt2, loss_on="answers")
    with pytest.raises(ValueError, match="max_length must be a positive int"):
        CrossTokenizerCollator(qwen, gpt2, max_length=0)


def test_collator_and_loss_build_the_table_from_tokenizers(tmp_path, monkeypatch, qwen, gpt2):
    """Two tokenizers and no table: the table is built once, cached where XTOK_KD_CACHE points, and reused."""
    import torch

    from xtok_kd import CrossTokenizerKDLoss

    monkeypatch.setenv("XTOK_KD_CACHE", str(tmp_path))
    collator = CrossTokenizerCollator(qwen, gpt2)
    table = collator.table
    assert collator.table is table
    cached = list(tmp_path.glob("*.safetensors"))
    assert len(cached) == 1 and qwen.fingerprint in cached[0].name and gpt2.fingerprint in cached[0].name
    stamp = cached[0].stat().st_mtime_ns
    kd = CrossTokenizerKDLoss(teacher=qwen, student=gpt2)  # loads the cached table, does not rebuild
    assert cached[0].stat().st_mtime_ns == stamp
    assert torch.equal(kd.projection_dst, CrossTokenizerKDLoss(table=table).projection_dst)
    with pytest.raises(ValueError, match="pass both teacher= and student="):
        CrossTokenizerKDLoss(teacher=qwen)
    with pytest.raises(ValueError, match="either table= or teacher=/student="):
        CrossTokenizerKDLoss(table=table, teacher=qwen, student=gpt2)
