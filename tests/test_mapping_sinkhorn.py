"""mapping="sinkhorn" through CrossTokenizerKDLoss: values equal the transport core on hand-gathered rows."""

from __future__ import annotations

import warnings

import pytest
import torch

from conftest import corpus_text
from xtok_kd.losses import CrossTokenizerKDLoss, TeacherTopK
from xtok_kd.losses.transport import entropic_ot, lexical_cost
from xtok_kd.sequence import align_spans

vocab = pytest.importorskip("xtok_kd.vocab")


@pytest.fixture(scope="module")
def qwen_mistral(qwen, mistral):
    return vocab.get_or_build(qwen, mistral)


def _inputs(teacher, student, seed=0, chars=240, scale=3.0):
    text = corpus_text()[:chars]
    et, es = teacher.encode(text), student.encode(text)
    al = align_spans([et], [es])
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(1, len(et), teacher.vocab_size, generator=g, dtype=torch.float64) * scale
    s = torch.randn(1, len(es), student.vocab_size, generator=g, dtype=torch.float64) * scale
    return al, t, s


@pytest.mark.parametrize("support", ["top_k", "union"])
def test_sinkhorn_equals_the_transport_core_on_gathered_rows(qwen, mistral, qwen_mistral, support):
    al, t, s = _inputs(qwen, mistral)
    k = 16
    loss = CrossTokenizerKDLoss(table=qwen_mistral, mapping="sinkhorn", top_k=k, reduction="none", block_rows=9,
                                sinkhorn_max_iter=500, sinkhorn_support=support)
    s1 = s.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every row converges at these settings
        out = loss(s1, t, al)
    rows = al.rows(only_loss=True)
    t_lp = torch.log_softmax(t[0, rows.teacher_first - 1], -1)
    s2 = s.clone().requires_grad_(True)
    s_lp = torch.log_softmax(s2[0, rows.student_first - 1], -1)
    t_top, s_ids = t_lp.topk(k, -1), s_lp.detach().topk(k, -1).indices
    a = torch.cat([t_top.values.exp(), 1 - t_top.values.exp().sum(-1, keepdim=True)], -1)
    buffers = dict(loss.named_buffers())
    if support == "union":  # slow reference: each teacher top-k token's student partner joins, once, as a Python set
        exact, first = buffers["sinkhorn_exact_t2s"], buffers["sinkhorn_t2s_first"]
        rows_ids = []
        for r in range(s_ids.shape[0]):
            seen, extra = set(s_ids[r].tolist()), []
            for tok in t_top.indices[r].tolist():
                m = int(exact[tok]) if int(exact[tok]) >= 0 else int(first[tok])
                extra.append(m if m >= 0 and m not in seen else -1)
                seen.add(m)
            rows_ids.append(s_ids[r].tolist() + extra)
        s_ids = torch.tensor(rows_ids)
        assert (s_ids[:, k:] >= 0).any()  # the union adds tokens
    q = s_lp.gather(1, s_ids.clamp_min(0)).exp() * (s_ids >= 0)
    b = torch.cat([q, (1 - q.sum(-1, keepdim=True)).clamp_min(0)], -1)
    cost = lexical_cost(t_top.indices, s_ids, exact_t2s=buffers["sinkhorn_exact_t2s"],
                        t2s_first=buffers["sinkhorn_t2s_first"], s2t_first=buffers["sinkhorn_s2t_first"],
                        t2s_neighbours=buffers["sinkhorn_t2s_neighbours"],
                        t2s_neighbour_scores=buffers["sinkhorn_t2s_neighbour_scores"],
                        s2t_neighbours=buffers["sinkhorn_s2t_neighbours"],
                        s2t_neighbour_scores=buffers["sinkhorn_s2t_neighbour_scores"],
                        teacher_lengths=buffers["sinkhorn_teacher_token_lengths"],
                        student_lengths=buffers["sinkhorn_student_token_lengths"], dtype=torch.float64)
    want = entropic_ot(a, b, cost, epsilon=0.1, max_iter=500, tol=1e-4)
    torch.testing.assert_close(out.loss, want.value.detach(), rtol=1e-6, atol=1e-9)
    w = torch.rand(want.value.shape[0], dtype=torch.float64)
    (g1,) = torch.autograd.grad((out.loss * w).sum(), s1)
    (g2,) = torch.autograd.grad((want.value * w).sum(), s2)
    torch.testing.assert_close(g1, g2, rtol=1e-6, atol=1e-9)
    assert out.metrics["sinkhorn_unconverged"] == 0
    assert 0 < out.metrics["sinkhorn_cost"] < 1


def test_unbiased_sinkhorn_is_zero_for_identical_inputs(mistral):
    table = vocab.VocabAlignment.build(mistral, mistral)
    al, t, _ = _inputs(mistral, mistral, chars=120)
    for cost, extra in (("lexical", {}), ("embedding", {"teacher_embeddings": torch.randn(mistral.vocab_size, 16)})):
        loss = CrossTokenizerKDLoss(table=table, mapping="sinkhorn", unbiased=True, cost=cost, top_k=8,
                                    sinkhorn_max_iter=2000, sinkhorn_tol=1e-9, **extra)
        s = t.clone().requires_grad_(True)
        out = loss(s, t, al)
        # exactly 0 with lexical costs; embedding costs carry fp32 cosine rounding (1 - cos(e, e) ~ 1e-7)
        assert abs(float(out.loss.detach())) < (1e-12 if cost == "lexical" else 1e-6), cost
        assert out.metrics["sinkhorn_unconverged"] == 0
        (g,) = torch.autograd.grad(out.loss, s)
        assert float(g.abs().max()) < (1e-9 if cost == "lexical" else 1e-5), cost  # a minimum: the envelope gradients cancel at convergence


@pytest.mark.parametrize("unbiased", [False, True])
def test_sinkhorn_cached_teacher_bf16_and_embedding_cost(qwen, mistral, qwen_mistral, unbiased):
    al, t, s = _inputs(qwen, mistral, seed=2)
    lp = torch.log_softmax(t.float(), -1).topk(32, -1)
    emb = torch.randn(151_936, 24)
    for kw in ({}, {"cost": "embedding", "teacher_embeddings": emb}):
        loss = CrossTokenizerKDLoss(table=qwen_mistral, mapping="sinkhorn", top_k=32, unbiased=unbiased, **kw)
        x = s.to(torch.bfloat16).requires_grad_(True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = loss(x, TeacherTopK(lp.indices, lp.values), al)
        out.loss.backward()
        assert torch.isfinite(out.loss) and torch.isfinite(x.grad.float()).all() and float(x.grad.abs().sum()) > 0
    assert "sinkhorn_embeddings" not in loss.state_dict()  # a model's embeddings are not saved with the loss


def test_unconverged_rows_are_counted_and_warned(qwen, mistral, qwen_mistral):
    al, t, s = _inputs(qwen, mistral, seed=4)
    loss = CrossTokenizerKDLoss(table=qwen_mistral, mapping="sinkhorn", sinkhorn_max_iter=1, epsilon=0.01)
    with pytest.warns(UserWarning, match="did not converge within sinkhorn_max_iter=1"):
        out = loss(s, t, al)
    assert out.metrics["sinkhorn_unconverged"] == out.metrics["chunks"] > 0


@pytest.mark.parametrize("kw, match", [
    (dict(epsilon=0.0), "epsilon must be a finite number > 0"),
    (dict(epsilon=float("nan")), "epsilon"),
    (dict(cost="euclid"), "cost='euclid' is not supported"),
    (dict(cost="embedding"), "needs teacher_embeddings="),
    (dict(cost="embedding", teacher_embeddings=torch.randn(10, 4)), "fewer than the teacher vocabulary"),
    (dict(teacher_embeddings=torch.randn(10, 4)), "cost='embedding' only"),
    (dict(top_k=10**6), "exceeds the smaller vocabulary"),
    (dict(sinkhorn_max_iter=0), "sinkhorn_max_iter"),
    (dict(unbiased="yes"), "unbiased must be True or False"),
])
def test_sinkhorn_options_are_checked(qwen_mistral, kw, match):
    with pytest.raises(ValueError, match=match):
        CrossTokenizerKDLoss(table=qwen_mistral, mapping="sinkhorn", **kw)


def test_sinkhorn_top_k_above_the_cache_raises(qwen, mistral, qwen_mistral):
    al, t, s = _inputs(qwen, mistral, chars=80)
    lp = torch.log_softmax(t.float(), -1).topk(8, -1)
    loss = CrossTokenizerKDLoss(table=qwen_mistral, mapping="sinkhorn", top_k=16)
    with pytest.raises(ValueError, match="top_k=16 but the cached teacher holds only 8"):
        loss(s, TeacherTopK(lp.indices, lp.values), al)
    with pytest.raises(ValueError, match="epsilon applies to mapping='sinkhorn'"):
        CrossTokenizerKDLoss(table=qwen_mistral, mapping="projection", epsilon=0.5)


def test_sequence_level_term_is_added_to_each_chunk_of_its_sequence(qwen, mistral, qwen_mistral):
    from xtok_kd.losses.sequence_ot import sequence_transport

    al, t, s = _inputs(qwen, mistral, seed=5, chars=160)
    base = CrossTokenizerKDLoss(table=qwen_mistral, mapping="sinkhorn", top_k=16, reduction="none")
    both = CrossTokenizerKDLoss(table=qwen_mistral, mapping="sinkhorn", top_k=16, reduction="none",
                                sequence_weight=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = base(s, t, al)
        x = s.clone().requires_grad_(True)
        b = both(x, t, al)
    sc = torch.as_tensor(al.student_chunk)
    tc = torch.as_tensor(al.teacher_chunk)
    s_mask = torch.zeros_like(sc, dtype=torch.bool)
    t_mask = torch.zeros_like(tc, dtype=torch.bool)
    s_mask[:, :-1] = sc[:, 1:] >= 0
    t_mask[:, :-1] = tc[:, 1:] >= 0
    seq = sequence_transport(s, t, s_mask, t_mask, top_k=16)
    torch.testing.assert_close(b.loss.detach(), a.loss + 0.5 * seq.value[0], rtol=1e-6, atol=1e-9)
    assert b.metrics["sequence_ot"] == pytest.approx(float(seq.value[0]), rel=1e-6)
    b.loss.sum().backward()
    assert torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match="sequence_weight applies to mapping='sinkhorn'"):
        CrossTokenizerKDLoss(table=qwen_mistral, sequence_weight=1.0)
    with pytest.raises(ValueError, match="sequence_weight must be a finite number >= 0"):
        CrossTokenizerKDLoss(table=qwen_mistral, mapping="sinkhorn", sequence_weight=-1.0)
