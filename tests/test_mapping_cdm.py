"""mapping="cdm": contextual top-k matching; on one tokenizer it is token-level KD on the union of the top-k sets."""

from __future__ import annotations

import pytest
import torch

from conftest import corpus_text
from xtok_kd.losses import CrossTokenizerKDLoss, TeacherTopK, divergence
from xtok_kd.sequence import align_spans

vocab = pytest.importorskip("xtok_kd.vocab")


@pytest.fixture(scope="module")
def mistral_mistral(mistral):
    return vocab.VocabAlignment.build(mistral, mistral)


def _logits(n_t, n_s, vt, vs, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(1, n_t, vt, generator=g, dtype=torch.float64) * scale
    s = torch.randn(1, n_s, vs, generator=g, dtype=torch.float64) * scale
    return t, s


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd"])
@pytest.mark.parametrize("k", [1, 5, 32])
def test_cdm_on_one_tokenizer_is_token_kd_on_the_union_of_top_k(mistral, mistral_mistral, kind, k):
    enc = mistral.encode(corpus_text()[:200])
    al = align_spans([enc], [enc])
    t, s = _logits(len(enc), len(enc), mistral.vocab_size, mistral.vocab_size, seed=k)
    loss = CrossTokenizerKDLoss(table=mistral_mistral, mapping="cdm", top_k=k, divergence=kind, reduction="none",
                                block_rows=5)
    s1 = s.clone().requires_grad_(True)
    out = loss(s1, t, al)
    rows = al.rows(only_loss=True)
    s2 = s.clone().requires_grad_(True)
    want = []
    for i in range(rows.sample.shape[0]):
        t_lp = torch.log_softmax(t[0, int(rows.teacher_first[i]) - 1], -1)
        s_lp = torch.log_softmax(s2[0, int(rows.student_first[i]) - 1], -1)
        union = torch.unique(torch.cat([t_lp.topk(k).indices, s_lp.detach().topk(k).indices]))
        a = torch.log_softmax(t_lp[union], -1)
        b = torch.log_softmax(s_lp[union], -1)
        want.append(divergence(a[None], b[None], kind=kind)[0])
    want = torch.stack(want)
    torch.testing.assert_close(out.loss, want.detach(), rtol=1e-9, atol=1e-11)
    w = torch.rand(want.shape[0], dtype=torch.float64)
    (g1,) = torch.autograd.grad((out.loss * w).sum(), s1)
    (g2,) = torch.autograd.grad((want * w).sum(), s2)
    torch.testing.assert_close(g1, g2, rtol=1e-8, atol=1e-11)
    assert out.metrics["cdm_teacher_matched"] == pytest.approx(1.0)
    assert out.metrics["cdm_student_matched"] == pytest.approx(1.0)


def test_cdm_identical_inputs_give_zero(mistral, mistral_mistral):
    enc = mistral.encode(corpus_text()[:200])
    al = align_spans([enc], [enc])
    t, _ = _logits(len(enc), 1, mistral.vocab_size, 1)
    out = CrossTokenizerKDLoss(table=mistral_mistral, mapping="cdm")(t.clone(), t, al)
    assert float(out.loss) == pytest.approx(0.0, abs=1e-12)


def test_cdm_cached_teacher_and_bf16(qwen, mistral):
    text = corpus_text()[:300]
    et, es = qwen.encode(text), mistral.encode(text)
    al = align_spans([et], [es])
    t, s = _logits(len(et), len(es), qwen.vocab_size, mistral.vocab_size, seed=3)
    loss = CrossTokenizerKDLoss(teacher=qwen, student=mistral, mapping="cdm", top_k=16)
    lp = torch.log_softmax(t, -1).topk(16, -1)
    sb = s.to(torch.bfloat16).requires_grad_(True)
    out = loss(sb, TeacherTopK(lp.indices, lp.values.float()), al)
    out.loss.backward()
    assert torch.isfinite(out.loss) and float(out.loss) > 0
    assert sb.grad.dtype == torch.bfloat16 and torch.isfinite(sb.grad.float()).all()
    assert 0 < out.metrics["cdm_teacher_matched"] <= 1 and 0 < out.metrics["cdm_student_matched"] <= 1


def test_cdm_options_are_checked(mistral_mistral):
    with pytest.raises(ValueError, match="cdm_max_distance"):
        CrossTokenizerKDLoss(table=mistral_mistral, mapping="cdm", cdm_max_distance=1.5)
    with pytest.raises(ValueError, match="cdm_max_distance applies to mapping='cdm'"):
        CrossTokenizerKDLoss(table=mistral_mistral, mapping="projection", cdm_max_distance=0.2)
    with pytest.raises(ValueError, match="needs table"):
        CrossTokenizerKDLoss(mapping="cdm")
