"""mapping="alm": chunk likelihoods compared by binarised f-divergences, against a per-chunk float64 loop."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import corpus_text
from xtok_kd.losses import CrossTokenizerKDLoss, TeacherTopK
from xtok_kd.losses.mappings.alm import binary_kl, log1mexp
from xtok_kd.sequence import align_spans

FLOOR = math.log(1e-8)


def _pair(teacher, student, text, seed=0, scale=3.0):
    et, es = teacher.encode(text), student.encode(text)
    al = align_spans([et], [es])
    g = torch.Generator().manual_seed(seed)
    t_ids = torch.as_tensor([list(et.ids)])
    s_ids = torch.as_tensor([list(es.ids)])
    t = torch.randn(1, len(et), teacher.vocab_size, generator=g, dtype=torch.float64) * scale
    s = torch.randn(1, len(es), student.vocab_size, generator=g, dtype=torch.float64) * scale
    return al, t, s, t_ids, s_ids


def _reference(al, t, s, t_ids, s_ids, kind):
    """One chunk at a time: sum of each token's floored log-probability, then the divergence."""
    rows = al.rows(only_loss=True)
    t_lp, s_lp = torch.log_softmax(t, -1), torch.log_softmax(s, -1)
    out = []
    for i in range(rows.sample.shape[0]):
        b = int(rows.sample[i])
        lls = []
        for lp, ids, first, count in ((t_lp, t_ids, rows.teacher_first, rows.teacher_count),
                                      (s_lp, s_ids, rows.student_first, rows.student_count)):
            f, n = int(first[i]), int(count[i])
            lls.append(sum(lp[b, j - 1, ids[b, j]].clamp_min(FLOOR) for j in range(f, f + n)))
        tl, sl = lls
        if kind == "abs_diff":
            out.append((tl - sl).abs())
        else:
            p, q = tl.clamp_max(-1e-6).exp(), sl.clamp_max(-1e-6).exp()
            out.append(p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q)))
    return torch.stack(out)


@pytest.mark.parametrize("kind", ["binary_kl", "abs_diff"])
def test_alm_matches_a_per_chunk_loop_values_and_gradients(qwen, mistral, kind):
    al, t, s, t_ids, s_ids = _pair(qwen, mistral, corpus_text()[:300])
    loss = CrossTokenizerKDLoss(teacher=qwen, student=mistral, mapping="alm", alm_divergence=kind, reduction="none",
                                block_rows=7)
    s1 = s.clone().requires_grad_(True)
    out = loss(s1, t, al, student_input_ids=s_ids, teacher_input_ids=t_ids)
    s2 = s.clone().requires_grad_(True)
    want = _reference(al, t, s2, t_ids, s_ids, kind)
    torch.testing.assert_close(out.loss, want.detach(), rtol=1e-9, atol=1e-10)
    w = torch.rand(want.shape[0], dtype=torch.float64)
    (g1,) = torch.autograd.grad((out.loss * w).sum(), s1)
    (g2,) = torch.autograd.grad((want * w).sum(), s2)
    torch.testing.assert_close(g1, g2, rtol=1e-7, atol=1e-10)
    assert out.metrics["alm_loglik_gap"] > 0
    assert out.metrics["chunks"] == want.shape[0]


@pytest.mark.parametrize("kind", ["binary_kl", "abs_diff"])
def test_alm_is_zero_for_identical_inputs(mistral, kind):
    al, t, _, t_ids, _ = _pair(mistral, mistral, corpus_text()[:300])
    loss = CrossTokenizerKDLoss(teacher=mistral, student=mistral, mapping="alm", alm_divergence=kind)
    s = t.clone().requires_grad_(True)
    out = loss(s, t, al, student_input_ids=t_ids, teacher_input_ids=t_ids)
    assert float(out.loss) == pytest.approx(0.0, abs=1e-12)
    (g,) = torch.autograd.grad(out.loss, s)
    assert float(g.abs().max()) < 1e-9


def test_alm_from_a_cached_teacher_equals_full_logits(qwen, mistral):
    al, t, s, t_ids, s_ids = _pair(qwen, mistral, corpus_text()[:300], seed=1)
    lp = torch.log_softmax(t, -1)
    top = lp.topk(8, -1)
    nxt = torch.zeros(t.shape[:2], dtype=torch.float64)
    nxt[:, :-1] = lp[:, :-1].gather(-1, t_ids[:, 1:, None]).squeeze(-1)
    loss = CrossTokenizerKDLoss(teacher=qwen, student=mistral, mapping="alm")
    full = loss(s, t, al, student_input_ids=s_ids, teacher_input_ids=t_ids).loss
    cached = loss(s, TeacherTopK(top.indices, top.values, nxt), al, student_input_ids=s_ids,
                  teacher_input_ids=t_ids).loss
    torch.testing.assert_close(full, cached, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="next_token_logprobs"):
        loss(s, TeacherTopK(top.indices, top.values), al, student_input_ids=s_ids, teacher_input_ids=t_ids)


def test_alm_needs_input_ids_and_rejects_merge(qwen, mistral):
    al, t, s, _, _ = _pair(qwen, mistral, corpus_text()[:100])
    loss = CrossTokenizerKDLoss(teacher=qwen, student=mistral, mapping="alm")
    with pytest.raises(ValueError, match="mapping='alm' needs student_input_ids"):
        loss(s, t, al)
    with pytest.raises(ValueError, match="merge must be 'none' with mapping='alm'"):
        CrossTokenizerKDLoss(teacher=qwen, student=mistral, mapping="alm", merge="observed")
    with pytest.raises(ValueError, match="alm_divergence="):
        CrossTokenizerKDLoss(teacher=qwen, student=mistral, mapping="alm", alm_divergence="kl")


def test_binary_kl_helpers_are_stable():
    x = torch.tensor([-1e-6, -1e-3, -0.5, -5.0, -50.0, -500.0], dtype=torch.float64)
    torch.testing.assert_close(log1mexp(x), torch.log(-torch.expm1(x)))
    assert torch.all(binary_kl(x, x) == 0)
    y = x.flip(0)
    assert torch.all(binary_kl(x, y) >= 0) and torch.isfinite(binary_kl(x, y)).all()
