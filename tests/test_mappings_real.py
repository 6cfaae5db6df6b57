"""Every mapping, forward and backward through CrossTokenizerKDLoss, on real tokenizer pairs and real tables:
Qwen2.5 -> Mistral (embedded) and Qwen2.5 -> Llama 3.2 (../shared; skipped without it)."""

from __future__ import annotations

import warnings

import pytest
import torch

from conftest import corpus_text
from xtok_kd.losses import CrossTokenizerKDLoss, TeacherTopK
from xtok_kd.sequence import align_spans

QWEN_PADDED = 151_936
CASES = [
    dict(mapping="projection", divergence="dkl", dkl_weights=(1.0, 1.0)),
    dict(mapping="sinkhorn", top_k=32),
    dict(mapping="sinkhorn", top_k=16, unbiased=True, cost="embedding"),
    dict(mapping="sinkhorn", top_k=16, sequence_weight=0.5),
    dict(mapping="cdm", divergence="fkl"),
    dict(mapping="cdm", divergence="dkl", dkl_weights=(0.5, 1.0), cdm_max_distance=0.3),
    dict(mapping="alm"),
    dict(mapping="alm", alm_divergence="abs_diff"),
]


def _run(teacher, student, case, *, cached: bool):
    text = corpus_text()[:500] + " 12345 naïve café — 東京"
    et, es = teacher.encode(text), student.encode(text)
    al = align_spans([et], [es])
    g = torch.Generator().manual_seed(0)
    t = torch.randn(1, len(et), QWEN_PADDED, generator=g) * 3
    s = (torch.randn(1, len(es), student.vocab_size + 64, generator=g) * 3).to(torch.bfloat16).requires_grad_(True)
    t_ids, s_ids = torch.as_tensor([list(et.ids)]), torch.as_tensor([list(es.ids)])
    kw = dict(case)
    if kw.get("cost") == "embedding":
        kw["teacher_embeddings"] = torch.randn(QWEN_PADDED, 32, generator=g)
    loss = CrossTokenizerKDLoss(teacher=teacher, student=student, **kw)
    teacher_in = t
    if cached:
        lp = torch.log_softmax(t[..., : teacher.vocab_size], -1)
        top = lp.topk(64, -1)
        nxt = torch.zeros(t.shape[:2])
        nxt[:, :-1] = lp[:, :-1].gather(-1, t_ids[:, 1:, None]).squeeze(-1)
        teacher_in = TeacherTopK(top.indices, top.values, nxt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a few unconverged Sinkhorn rows are reported, not failed
        out = loss(s, teacher_in, al, student_input_ids=s_ids, teacher_input_ids=t_ids)
    out.loss.backward()
    return out, s.grad


@pytest.mark.parametrize("cached", [False, True], ids=["logits", "cached-top64"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_qwen_to_mistral(qwen, mistral, case, cached):
    out, grad = _run(qwen, mistral, case, cached=cached)
    assert torch.isfinite(out.loss) and float(out.loss) > 0
    assert torch.isfinite(grad.float()).all() and float(grad.float().abs().sum()) > 0
    assert float(grad[..., mistral.vocab_size:].float().abs().sum()) == 0  # padding columns: no gradient
    assert all(v == v for v in out.metrics.values())  # no NaN metric


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_qwen_to_llama(qwen, llama, case):
    out, grad = _run(qwen, llama, case, cached=False)
    assert torch.isfinite(out.loss) and float(out.loss) > 0
    assert torch.isfinite(grad.float()).all() and float(grad.float().abs().sum()) > 0
