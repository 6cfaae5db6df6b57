"""``teacher_tail=True`` (projection, top-k teacher): the top-k compared as absolute probabilities plus one tail atom
per side, against a float64 reference (values and gradients); a no-op with full logits; refused elsewhere."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reference import FakeTable, _chunk_rows, dense_projection, ref_divergence
from xtok_kd.losses import CrossTokenizerKDLoss, TeacherTopK
from xtok_kd.losses.options import LossOptions
from xtok_kd.sequence import align_spans

VT, VS, K = 97, 89, 7
TABLE = FakeTable(VT, VS, seed=3, extra=0, unmapped=9)  # one projection entry per student id: pushed mass <= 1


def spans(rng: np.random.Generator, nbytes: int, density: float) -> np.ndarray:
    cuts = np.sort(rng.choice(np.arange(1, nbytes), size=int(density * nbytes), replace=False))
    b = np.concatenate([[0], cuts, [nbytes]])
    return np.stack([b[:-1], b[1:]], 1)


@pytest.fixture(scope="module", params=[0, 1])
def batch(request):
    rng = np.random.default_rng(request.param)
    sizes = [40, 63, 25]
    al = align_spans([spans(rng, n, 0.6) for n in sizes],
                     [np.concatenate([[[0, 0]], spans(rng, n, 0.5)]) for n in sizes])
    g = torch.Generator().manual_seed(request.param)
    b, lt, ls = len(sizes), al.teacher_chunk.shape[1], al.student_chunk.shape[1]
    teacher = torch.randn(b, lt, VT, dtype=torch.float64, generator=g) * 2.5
    top = torch.log_softmax(teacher, -1).topk(K, -1)
    ids = top.indices.clone()
    ids[0, :, -1] = -1  # an empty slot in every row of sample 0
    return dict(alignment=al, student=torch.randn(b, ls, VS, dtype=torch.float64, generator=g) * 2,
                teacher=teacher, topk=TeacherTopK(ids, top.values))


def reference(batch, kind: str) -> torch.Tensor:
    proj = dense_projection(*TABLE.projection("student_to_teacher"), VS, VT)
    support = proj.sum(0) > 0
    s = batch["student"].double()
    ids, logp = batch["topk"].ids, batch["topk"].logprobs.double()
    losses = []
    for b, tf, _, sf, _ in _chunk_rows(batch["alignment"]):
        row_ids, row_lp = ids[b, tf - 1], logp[b, tf - 1]
        keep = (row_ids >= 0) & support[row_ids.clamp_min(0)]
        if not bool(keep.any()):
            losses.append(s.new_zeros(()))
            continue
        p = row_lp[keep].exp()
        q = (torch.softmax(s[b, sf - 1], -1) @ proj)[row_ids[keep]]
        pt, qt = torch.cat([p, (1 - p.sum())[None]]), torch.cat([q, (1 - q.sum())[None]])
        losses.append(ref_divergence(pt, qt, kind))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd", "akl", "tvd"])
def test_tail_matches_the_float64_reference_values_and_gradients(batch, kind):
    loss = CrossTokenizerKDLoss(table=TABLE, divergence=kind, teacher_tail=True)
    s = batch["student"].clone().requires_grad_()
    out = loss(s, batch["topk"], batch["alignment"])
    (g,) = torch.autograd.grad(out.loss, s)
    s_ref = batch["student"].clone().requires_grad_()
    ref = reference({**batch, "student": s_ref}, kind)
    (g_ref,) = torch.autograd.grad(ref, s_ref)
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g.double(), g_ref, rtol=1e-4, atol=1e-7)


def test_tail_differs_from_renormalised_top_k_and_is_zero_for_a_student_equal_to_the_teacher(batch):
    args = batch["student"], batch["topk"], batch["alignment"]
    plain = CrossTokenizerKDLoss(table=TABLE, teacher_tail=False)(*args).loss
    tail = CrossTokenizerKDLoss(table=TABLE, teacher_tail=True)(*args).loss
    assert float(tail) > float(plain) > 0  # the tail atom adds a non-negative term here (fkl, different masses)
    ident = FakeTable(VT, VT, identity=True)  # a student whose distribution is the teacher's: no loss at all
    rows = batch["teacher"][:1, :3].clone()
    al = align_spans([np.array([[0, 2], [2, 5], [5, 9]])], [np.array([[0, 2], [2, 5], [5, 9]])])
    top = torch.log_softmax(rows, -1).topk(K, -1)
    out = CrossTokenizerKDLoss(table=ident, teacher_tail=True)(rows, TeacherTopK(top.indices, top.values), al)
    assert float(out.loss) < 1e-9


def test_tail_is_a_no_op_with_full_logits(batch):
    args = batch["student"], batch["teacher"], batch["alignment"]
    a = CrossTokenizerKDLoss(table=TABLE, teacher_tail=False)(*args).loss
    b = CrossTokenizerKDLoss(table=TABLE, teacher_tail=True)(*args).loss
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize(("options", "match"), [
    ({"teacher_tail": "yes"}, "teacher_tail must be True or False, got 'yes'"),
    # the value that is not the default (the default is accepted for every mapping, and ignored by the others)
    ({"teacher_tail": not LossOptions().teacher_tail, "mapping": "uld"},
     "teacher_tail applies to mapping='projection' only"),
])
def test_bad_teacher_tail_is_refused_naming_the_value(options, match):
    with pytest.raises(ValueError, match=match):
        CrossTokenizerKDLoss(table=TABLE, **options)
