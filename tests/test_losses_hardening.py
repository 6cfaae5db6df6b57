"""Hardening of the losses against wrong tables, hostile inputs and ruled-out tokens.

* a table whose fingerprints or widths do not match the alignment / logits is refused, padding is accepted;
* ``TeacherTopK`` empty slots (negative ids) carry no mass, ids past the vocabulary raise;
* ``-inf`` logits (banned tokens) work under every divergence and mapping, against the float64 reference (values AND
  gradients), without NaN; NaN / +inf / a row of -inf raise with the position;
* bad ``temperature``, ``num_items_in_batch``, input ids, alignment arguments raise with the value and the fix.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest
import torch

from conftest import corpus_text
from reference import FakeTable, dense_projection, ref_divergence, ref_loss
from xtok_kd.losses import CrossTokenizerKDLoss, TeacherTopK, divergence, token_kd_loss
from xtok_kd.losses.module import max_padding
from xtok_kd.sequence import align_spans

VT, VS = 131, 123
TABLE = FakeTable(VT, VS, seed=1)
DIVERGENCES = ["fkl", "rkl", "jsd", "tvd", "skl", "srkl", "akl", "symmetric_kl"]
INFINITE_WITH_TEACHER_ZEROS = {"rkl", "symmetric_kl", "akl"}  # KL(q || p) with p = 0 < q is +inf


def with_fingerprints(alignment, teacher, student):
    """The alignment carrying tokenizer fingerprints (the collator's job once ``Alignment`` has the fields)."""
    try:
        return dataclasses.replace(alignment, teacher_fingerprint=teacher, student_fingerprint=student)
    except TypeError:  # Alignment without the fields yet: set them on a copy
        copy = dataclasses.replace(alignment)
        object.__setattr__(copy, "teacher_fingerprint", teacher)
        object.__setattr__(copy, "student_fingerprint", student)
        return copy


# ---------------------------------------------------------------- a small synthetic batch (as in test_losses.py)
def _spans(rng, nbytes, density):
    cuts = np.sort(rng.choice(np.arange(1, nbytes), size=int(density * nbytes), replace=False))
    b = np.concatenate([[0], cuts, [nbytes]])
    return np.stack([b[:-1], b[1:]], 1)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(5)
    sizes = [60, 45, 80]
    t = [np.concatenate([[[0, 0]], _spans(rng, n, 0.55)]) for n in sizes]
    s = [np.concatenate([[[0, 0]], _spans(rng, n, 0.5)]) for n in sizes]
    al = align_spans(t, s)
    b, lt, ls = 3, al.teacher_chunk.shape[1], al.student_chunk.shape[1]
    g = torch.Generator().manual_seed(3)
    return dict(
        alignment=al,
        student=torch.randn(b, ls, VS + 5, dtype=torch.float64, generator=g) * 2,
        teacher=torch.randn(b, lt, VT + 7, dtype=torch.float64, generator=g) * 2,
        student_ids=torch.randint(0, VS, (b, ls), generator=g),
        teacher_ids=torch.randint(0, VT, (b, lt), generator=g),
    )


def _proj(direction):
    src, dst, w = TABLE.projection(direction)
    n_src, n_dst = (VS, VT) if direction == "student_to_teacher" else (VT, VS)
    return dense_projection(src, dst, w, n_src, n_dst)


def _fast(batch, teacher, *, reduction="none", student=None, **kw):
    s = (batch["student"] if student is None else student).clone().requires_grad_()
    out = CrossTokenizerKDLoss(table=TABLE, reduction=reduction, **kw)(
        s, teacher, batch["alignment"], student_input_ids=batch["student_ids"], teacher_input_ids=batch["teacher_ids"])
    return out, s


def _grad_of_finite(values, s):
    """Gradient of the sum of the finite per-chunk values (an infinite chunk has no finite gradient)."""
    finite = torch.isfinite(values)
    (g,) = torch.autograd.grad(values[finite].sum(), s, allow_unused=True)
    return torch.zeros_like(s) if g is None else g


def _only_chunks(al, keep):
    """The alignment with only the loss chunks flagged in ``keep`` (over ``al.rows(only_loss=True)``) in the loss."""
    used = np.flatnonzero(al.has_rows & al.chunk_loss_mask)
    mask = np.zeros(al.num_chunks, dtype=bool)
    mask[used[keep.numpy()]] = True
    return al.with_loss_mask(mask)


def _banned(batch, n=12, seed=0, student=False):
    """Teacher (or student) logits with ``n`` random columns at -inf in every aligned row (banned tokens)."""
    key = "student" if student else "teacher"
    x = batch[key].clone()
    g = torch.Generator().manual_seed(seed)
    width = VS if student else VT
    cols = torch.randperm(width, generator=g)[:n]
    x[..., cols] = float("-inf")
    return x


# ================================================================ item 4: the table must fit alignment and logits
@pytest.fixture(scope="module")
def gpt2_mistral(gpt2, mistral):
    from xtok_kd.vocab import VocabAlignment

    return VocabAlignment.build(gpt2, mistral)


@pytest.fixture(scope="module")
def real_batch(gpt2, mistral):
    texts = [corpus_text()[:160], corpus_text()[400:520]]
    t_enc, s_enc = [gpt2.encode(t) for t in texts], [mistral.encode(t) for t in texts]
    al = align_spans(t_enc, s_enc)
    lt, ls = al.teacher_chunk.shape[1], al.student_chunk.shape[1]
    return al, lt, ls


def _logits(b, length, width, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, length, width, generator=g) * 3


def test_alignment_of_other_tokenizers_is_refused(gpt2, mistral, qwen, gpt2_mistral, real_batch):
    al, lt, ls = real_batch
    loss = CrossTokenizerKDLoss(table=gpt2_mistral)
    s, t = _logits(2, ls, mistral.vocab_size, 0), _logits(2, lt, gpt2.vocab_size, 1)
    ok = loss(s, t, with_fingerprints(al, gpt2.fingerprint, mistral.fingerprint)).loss
    assert torch.isfinite(ok)
    unknown = loss(s, t, with_fingerprints(al, None, None)).loss  # None: unknown, not checked
    torch.testing.assert_close(ok, unknown, rtol=0, atol=0)
    with pytest.raises(ValueError) as err:
        loss(s, t, with_fingerprints(al, qwen.fingerprint, mistral.fingerprint))
    msg = str(err.value)
    assert qwen.fingerprint in msg and gpt2.fingerprint in msg and "teacher" in msg
    assert "rebuild or load the table" in msg and "collator" in msg
    assert mistral.fingerprint in msg  # the table's pair
    with pytest.raises(ValueError, match="swapped") as err:
        loss(s, t, with_fingerprints(al, mistral.fingerprint, gpt2.fingerprint))
    assert "student tokenizer has fingerprint " + gpt2.fingerprint in str(err.value)


def test_other_models_logits_are_refused_padding_accepted(gpt2, mistral, gpt2_mistral, real_batch):
    """128,256 (Llama 3) and 151,936 (Qwen2.5) columns against a GPT-2 -> Mistral table raise; a padded width within
    max(1024, V // 32) is accepted and sliced (same value and gradient as the exact width)."""
    al, lt, ls = real_batch
    vt, vs = gpt2.vocab_size, mistral.vocab_size
    for mapping in ["projection", "uld", "hybrid"]:
        loss = CrossTokenizerKDLoss(table=gpt2_mistral, mapping=mapping)
        s = _logits(2, ls, vs, 2)
        t = _logits(2, lt, vt, 3)
        for wide in (128_256, 151_936):
            with pytest.raises(ValueError) as err:
                loss(s, _logits(2, lt, wide, 4), al)
            msg = str(err.value)
            assert f"teacher logits have {wide} columns" in msg and str(vt) in msg and "get_or_build" in msg
            assert gpt2.fingerprint in msg and mistral.fingerprint in msg  # the table's pair
            with pytest.raises(ValueError, match=f"student logits have {wide} columns.*{vs} ids"):
                loss(_logits(2, ls, wide, 5), t, al)
        # 271 extra columns (Qwen2.5's padding) on both sides: accepted, identical to the exact width.
        sp = torch.cat([s, _logits(2, ls, 271, 6)], -1).requires_grad_()
        tp = torch.cat([t, _logits(2, lt, 271, 7)], -1)
        a = loss(sp, tp, al).loss
        (ga,) = torch.autograd.grad(a, sp)
        s0 = s.clone().requires_grad_()
        b = loss(s0, t, al).loss
        (gb,) = torch.autograd.grad(b, s0)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(ga[..., :vs], gb, rtol=0, atol=0)
        assert bool((ga[..., vs:] == 0).all())
    # The bound itself: V + max_padding(V) passes, one more column does not.
    loss = CrossTokenizerKDLoss(table=gpt2_mistral, mapping="uld")
    s = _logits(2, ls, vs, 8)
    loss(s, _logits(2, lt, vt + max_padding(vt), 9), al)
    with pytest.raises(ValueError, match=f"{max_padding(vt) + 1} more than"):
        loss(s, _logits(2, lt, vt + max_padding(vt) + 1, 9), al)


def test_swapped_logits_get_a_hint(gpt2, mistral, gpt2_mistral, real_batch):
    al, lt, ls = real_batch
    loss = CrossTokenizerKDLoss(table=gpt2_mistral, mapping="uld")
    # a student-wide teacher tensor of the right length: names the swap
    with pytest.raises(ValueError, match="swapped"):
        loss(_logits(2, ls, mistral.vocab_size, 0), _logits(2, lt, mistral.vocab_size, 1), al)


def test_padding_rule_covers_real_models():
    assert max_padding(151_665) >= 151_936 - 151_665  # Qwen2.5
    assert max_padding(151_665) >= 152_064 - 151_665  # Qwen2.5-7B
    assert max_padding(50_295) >= 51_200 - 50_295  # Phi-2
    assert max_padding(100_015) >= 102_400 - 100_015  # DeepSeek-LLM
    assert max_padding(50_257) < 128_256 - 50_257 and max_padding(32_000) < 50_257 - 32_000
    assert max_padding(128_256) < 151_936 - 128_256  # Qwen logits against a Llama 3 vocabulary


def test_topk_ids_outside_vocabulary_raise(gpt2, mistral, gpt2_mistral, real_batch):
    al, lt, ls = real_batch
    t = torch.log_softmax(_logits(2, lt, gpt2.vocab_size, 1), -1).topk(5, -1)
    ids = t.indices.clone()
    row = int(al.rows(only_loss=True).teacher_row[3])
    b = int(al.rows(only_loss=True).sample[3])
    ids[b, row, 2] = 100_000
    for mapping in ["projection", "uld"]:
        with pytest.raises(ValueError) as err:
            CrossTokenizerKDLoss(table=gpt2_mistral, mapping=mapping)(
                _logits(2, ls, mistral.vocab_size, 0), TeacherTopK(ids, t.values), al)
        msg = str(err.value)
        assert "100000" in msg and f"batch {b}, position {row}" in msg and "slot 2" in msg
        assert str(gpt2.vocab_size) in msg


def test_get_or_build_table_refuses_wide_logits(gpt2, mistral, real_batch, monkeypatch, tmp_path):
    monkeypatch.setenv("XTOK_KD_CACHE", str(tmp_path))
    al, lt, ls = real_batch
    loss = CrossTokenizerKDLoss(teacher=gpt2, student=mistral, mapping="projection")
    with pytest.raises(ValueError, match="128256 columns"):
        loss(_logits(2, ls, mistral.vocab_size, 0), _logits(2, lt, 128_256, 1), al)


def test_uld_with_tokenizers_knows_the_vocabularies(gpt2, mistral, gpt2_mistral, real_batch):
    """uld needs no table; given teacher=/student= it still slices the padding and checks widths and fingerprints.
    Without a table or sizes the logits' widths are the vocabularies (nothing to check)."""
    al, lt, ls = real_batch
    by_tok = CrossTokenizerKDLoss(teacher=gpt2, student=mistral, mapping="uld")
    by_table = CrossTokenizerKDLoss(table=gpt2_mistral, mapping="uld")
    assert (by_tok.teacher_vocab_size, by_tok.student_vocab_size) == (gpt2.vocab_size, mistral.vocab_size)
    s = _logits(2, ls, mistral.vocab_size + 64, 0)
    t = _logits(2, lt, gpt2.vocab_size + 47, 1)
    torch.testing.assert_close(by_tok(s, t, al).loss, by_table(s, t, al).loss, rtol=0, atol=0)
    with pytest.raises(ValueError, match="128256 columns"):
        by_tok(s, _logits(2, lt, 128_256, 2), al)
    with pytest.raises(ValueError, match="fingerprint"):
        by_tok(s, t, with_fingerprints(al, mistral.fingerprint, mistral.fingerprint))
    bare = CrossTokenizerKDLoss(mapping="uld")
    assert torch.isfinite(bare(s, _logits(2, lt, 128_256, 2), al).loss)  # documented: nothing to compare with
    with pytest.raises(ValueError, match="contradicts"):
        CrossTokenizerKDLoss(table=gpt2_mistral, mapping="uld", teacher_vocab_size=50_000)


# ================================================================ item 8: TeacherTopK empty slots
def _topk_with_empty(batch, k=9, seed=0):
    """Top-k of the teacher with a random number of slots per row emptied (-1, garbage logprobs) and shuffled."""
    t = torch.log_softmax(batch["teacher"][..., :VT], -1)
    vals, ids = t.topk(k, -1)
    g = torch.Generator().manual_seed(seed)
    empty = torch.rand(ids.shape, generator=g) < 0.35
    ids = ids.masked_fill(empty, -1)
    vals = vals.masked_fill(empty, 7.0)  # garbage: must be ignored
    perm = torch.argsort(torch.rand(ids.shape, generator=g), -1)
    return TeacherTopK(ids.gather(-1, perm), vals.gather(-1, perm))


def _ref_topk(batch, topk, *, mapping, kind="fkl", direction="student_to_teacher", top_k=None):
    """float64 reference per chunk with the empty slots removed (only the known (id, logprob) pairs used)."""
    s = batch["student"].clone().requires_grad_()
    q_all = torch.softmax(s[..., :VS], -1)
    proj = _proj(direction) if mapping == "projection" else None
    out = []
    for b, row_t, row_s in _chunks(batch["alignment"]):
        keep = topk.ids[b, row_t] >= 0
        ids, logp = topk.ids[b, row_t][keep], topk.logprobs[b, row_t][keep].double()
        q = q_all[b, row_s]
        if mapping == "uld":
            p = torch.sort(logp.exp(), descending=True).values
            qs = torch.sort(q, descending=True).values
            kk = min(top_k or len(ids), len(ids))
            head = (p[:kk] - qs[:kk]).abs().sum()
            out.append(head + ((1 - p[:kk].sum()) - (1 - qs[:kk].sum())).abs())
        elif direction == "student_to_teacher":
            reach = proj.sum(0) > 0
            use = reach[ids]
            ids, logp = ids[use], logp[use]
            p = logp.exp() / logp.exp().sum()
            qp = (q @ proj)[ids]
            out.append(ref_divergence(p, qp / qp.sum(), kind))
        else:
            p = torch.zeros(VT, dtype=torch.float64).index_put((ids,), logp.exp())
            pp = p @ proj
            valid = pp > 0
            out.append(ref_divergence(pp[valid] / pp[valid].sum(), q[valid] / q[valid].sum(), kind))
    vals = torch.stack(out)
    (g,) = torch.autograd.grad(vals.sum(), s)
    return vals, g


def _chunks(al):
    rows = al.rows(only_loss=True)
    return [(int(b), int(t), int(s)) for b, t, s in zip(rows.sample, rows.teacher_row, rows.student_row)]


@pytest.mark.parametrize("kw", [dict(mapping="projection", divergence="fkl", teacher_tail=False),
                                dict(mapping="projection", divergence="jsd", teacher_tail=False),
                                dict(mapping="projection", divergence="akl", teacher_tail=False),
                                dict(mapping="projection", divergence="fkl", direction="teacher_to_student"),
                                dict(mapping="projection", divergence="rkl", direction="teacher_to_student"),
                                dict(mapping="uld"), dict(mapping="uld", top_k=4)])
def test_topk_empty_slots_are_removed(batch, kw):
    topk = _topk_with_empty(batch)
    assert bool((topk.ids < 0).any(-1).any()) and bool((topk.ids >= 0).all(-1).any())
    out, s = _fast(batch, topk, **kw)
    (g,) = torch.autograd.grad(out.loss.sum(), s)
    ref, gr = _ref_topk(batch, topk, mapping=kw["mapping"], kind=kw.get("divergence", "fkl"),
                        direction=kw.get("direction", "student_to_teacher"), top_k=kw.get("top_k"))
    torch.testing.assert_close(out.loss, ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g[..., :VS], gr[..., :VS], rtol=1e-7, atol=1e-11)


def test_topk_minus_one_does_not_wrap_to_the_last_id(batch):
    """A -1 slot once landed on id V-1; the loss must not depend on the last teacher column at all."""
    topk = _topk_with_empty(batch)
    other = TeacherTopK(topk.ids, topk.logprobs.masked_fill(topk.ids < 0, -0.01))  # other garbage, same result
    for direction in ["student_to_teacher", "teacher_to_student"]:
        a, _ = _fast(batch, topk, mapping="projection", direction=direction)
        b, _ = _fast(batch, other, mapping="projection", direction=direction)
        torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=0)


def test_topk_row_with_only_empty_slots_gives_zero(batch):
    topk = _topk_with_empty(batch)
    ids, lp = topk.ids.clone(), topk.logprobs.clone()
    b, row_t, _ = _chunks(batch["alignment"])[2]
    ids[b, row_t] = -1
    for kw in [dict(mapping="projection"), dict(mapping="projection", direction="teacher_to_student"),
               dict(mapping="uld")]:
        out, s = _fast(batch, TeacherTopK(ids, lp), **kw)
        (g,) = torch.autograd.grad(out.loss.sum(), s)
        assert abs(float(out.loss[2].detach())) < 1e-12  # uld: |tail_p - tail_q| = |1 - sum q|, a rounding residue
        assert bool(torch.isfinite(out.loss).all()) and bool(torch.isfinite(g).all())


@pytest.mark.parametrize("change, match", [
    (lambda ids, lp: (ids.float(), lp), "integer"),
    (lambda ids, lp: (ids, lp + 5.0), "log-probabilities"),
    (lambda ids, lp: (ids, lp.masked_fill(ids == ids, float("nan"))), "NaN"),
])
def test_bad_topk_raises(batch, change, match):
    t = torch.log_softmax(batch["teacher"][..., :VT], -1).topk(5, -1)
    ids, lp = change(t.indices, t.values)
    with pytest.raises((ValueError, TypeError), match=match):
        CrossTokenizerKDLoss(table=TABLE)(batch["student"], TeacherTopK(ids, lp), batch["alignment"])


def test_topk_repeated_id_raises(batch):
    t = torch.log_softmax(batch["teacher"][..., :VT], -1).topk(5, -1)
    ids = t.indices.clone()
    ids[..., 1] = ids[..., 0]
    with pytest.raises(ValueError, match="repeat"):
        CrossTokenizerKDLoss(table=TABLE)(batch["student"], TeacherTopK(ids, t.values - 1.0), batch["alignment"])


# ================================================================ item 11: -inf logits, divergences and mappings
def _logp_pair(seed, n=5, v=40, teacher_zeros=6, student_zeros=0, shared=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, v, dtype=torch.float64, generator=g) * 2
    s = torch.randn(n, v, dtype=torch.float64, generator=g) * 2
    for i in range(n):
        cols = torch.randperm(v, generator=g)
        t[i, cols[:teacher_zeros + shared]] = float("-inf")
        s[i, cols[teacher_zeros:teacher_zeros + shared + student_zeros]] = float("-inf")
    return t, s


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("case", ["teacher_zeros", "student_zeros", "shared_zeros"])
def test_divergences_with_minus_inf_match_reference(kind, case):
    """log-probabilities with -inf entries: values equal the float64 reference (0 log 0 = 0, +inf where the
    divergence is infinite); gradients have no NaN and equal the reference's wherever the value is finite."""
    sizes = dict(teacher_zeros=dict(teacher_zeros=6), student_zeros=dict(teacher_zeros=0, student_zeros=6),
                 shared_zeros=dict(teacher_zeros=0, shared=6))[case]
    t, s = _logp_pair(11, **sizes)
    s = s.requires_grad_()
    got = divergence(torch.log_softmax(t, -1), torch.log_softmax(s, -1), kind=kind)
    (g,) = torch.autograd.grad(got.sum(), s)
    assert not bool(torch.isnan(got).any()) and bool(torch.isfinite(g).all())
    s2 = s.detach().clone().requires_grad_()
    p, q = torch.softmax(t, -1), torch.softmax(s2, -1)
    ref = torch.stack([ref_divergence(p[i], q[i], kind) for i in range(p.shape[0])])
    torch.testing.assert_close(got, ref.detach(), rtol=1e-10, atol=1e-12)
    infinite = (case == "teacher_zeros" and kind in INFINITE_WITH_TEACHER_ZEROS) or (
        case == "student_zeros" and kind in {"fkl", "symmetric_kl", "akl"})
    assert bool(torch.isinf(got).all()) == infinite
    if not infinite:
        (gr,) = torch.autograd.grad(ref.sum(), s2)
        finite_cols = torch.isfinite(s)
        torch.testing.assert_close(g[finite_cols], gr[finite_cols], rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_divergences_with_floored_or_all_zero_columns(kind):
    """Columns ruled out on both sides (0 log 0) give the divergence of the rows without those columns."""
    t, s = _logp_pair(12, teacher_zeros=0, shared=10)
    s = s.requires_grad_()
    a = divergence(torch.log_softmax(t, -1), torch.log_softmax(s, -1), kind=kind)
    vals = []
    for i in range(t.shape[0]):
        cols = torch.isfinite(t[i])
        vals.append(divergence(torch.log_softmax(t[i:i + 1, cols], -1), torch.log_softmax(s[i:i + 1, cols], -1),
                               kind=kind))
    b = torch.cat(vals)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    (ga,) = torch.autograd.grad(a.sum(), s)
    assert bool(torch.isfinite(ga).all())


MAPPING_CASES = (
    [dict(mapping="projection", divergence=d) for d in DIVERGENCES]
    + [dict(mapping="projection", divergence=d, direction="teacher_to_student") for d in DIVERGENCES]
    + [dict(mapping="hybrid", divergence=d) for d in ["fkl", "rkl", "jsd", "akl"]]
    + [dict(mapping="uld"), dict(mapping="uld", top_k=7), dict(mapping="uld", merge="observed"),
       dict(mapping="hybrid", divergence="jsd", merge="bayesian"), dict(mapping="projection", temperature=2.0)]
)


@pytest.mark.parametrize("kw", MAPPING_CASES, ids=lambda kw: "-".join(f"{v}" for v in kw.values()))
def test_banned_teacher_tokens_match_reference(batch, kw):
    """Teacher logits with 12 banned (-inf) columns in every row: per-chunk values equal the float64 reference,
    +inf exactly where the reference is infinite (and then no gradient), gradients equal elsewhere, no NaN."""
    teacher = _banned(batch)
    out, s = _fast(batch, teacher, **kw)
    assert not bool(torch.isnan(out.loss).any())
    g = _grad_of_finite(out.loss, s)
    assert bool(torch.isfinite(g).all())
    s2 = batch["student"].clone().requires_grad_()
    proj = _proj(kw.get("direction", "student_to_teacher")) if kw["mapping"] == "projection" else None
    ref = ref_loss(s2, teacher, batch["alignment"], mapping=kw["mapping"], kind=kw.get("divergence", "fkl"),
                   T=kw.get("temperature", 1.0), merge=kw.get("merge", "none"), proj=proj,
                   direction=kw.get("direction", "student_to_teacher"),
                   matched=(TABLE.exact_teacher, TABLE.exact_student), top_k=kw.get("top_k"),
                   student_ids=batch["student_ids"], teacher_ids=batch["teacher_ids"], vt=VT, vs=VS, reduction="none")
    torch.testing.assert_close(out.loss, ref.detach(), rtol=1e-9, atol=1e-12)
    finite = torch.isfinite(ref.detach())
    if bool(finite.any()):  # gradients over the finite chunks (the reference's infinite ones have NaN gradients)
        al = _only_chunks(batch["alignment"], finite)
        s4 = batch["student"].clone().requires_grad_()
        ref_f = ref_loss(s4, teacher, al, mapping=kw["mapping"], kind=kw.get("divergence", "fkl"),
                         T=kw.get("temperature", 1.0), merge=kw.get("merge", "none"), proj=proj,
                         direction=kw.get("direction", "student_to_teacher"),
                         matched=(TABLE.exact_teacher, TABLE.exact_student), top_k=kw.get("top_k"),
                         student_ids=batch["student_ids"], teacher_ids=batch["teacher_ids"], vt=VT, vs=VS,
                         reduction="sum")
        (gr,) = torch.autograd.grad(ref_f, s4)
        torch.testing.assert_close(g, gr, rtol=1e-7, atol=1e-11)
    else:
        assert bool((g == 0).all())
    # the full, reduced loss backpropagates without NaN even when it is +inf
    full, s3 = _fast(batch, teacher, reduction="mean", **kw)
    full.loss.backward()
    assert bool(torch.isfinite(s3.grad).all())
    if kw.get("divergence") in INFINITE_WITH_TEACHER_ZEROS and kw["mapping"] == "projection":
        assert float(full.loss.detach()) == math.inf


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_banned_student_tokens_no_nan(batch, kind):
    student = _banned(batch, student=True)
    for direction in ["student_to_teacher", "teacher_to_student"]:
        out, s = _fast(batch, batch["teacher"], student=student, mapping="projection", divergence=kind,
                       direction=direction)
        assert not bool(torch.isnan(out.loss).any())
        g = _grad_of_finite(out.loss, s)
        assert bool(torch.isfinite(g).all())
        s2 = student.clone().requires_grad_()
        ref = ref_loss(s2, batch["teacher"], batch["alignment"], mapping="projection", kind=kind,
                       proj=_proj(direction), direction=direction, vt=VT, vs=VS, reduction="none")
        torch.testing.assert_close(out.loss, ref.detach(), rtol=1e-9, atol=1e-12)


def test_teacher_mass_all_banned_on_the_compared_columns_gives_zero(batch):
    """When the teacher rules out every column the projection reaches, a chunk has nothing to compare: 0."""
    teacher = batch["teacher"].clone()
    b, row_t, _ = _chunks(batch["alignment"])[4]
    reach = _proj("student_to_teacher").sum(0) > 0
    assert not bool(reach.all())  # FakeTable leaves some teacher ids unreachable
    teacher[b, row_t, :VT][reach] = float("-inf")
    for kind in ["fkl", "rkl"]:
        out, s = _fast(batch, teacher, mapping="projection", divergence=kind)
        assert float(out.loss[4].detach()) == 0.0
        assert bool(torch.isfinite(_grad_of_finite(out.loss, s)).all())


@pytest.mark.parametrize("side", ["teacher", "student"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), "row"])
def test_nan_plus_inf_or_dead_rows_raise(batch, side, value):
    rows = batch["alignment"].rows(only_loss=True)
    x = batch[side].clone()
    b, pos = int(rows.sample[6]), int((rows.teacher_row if side == "teacher" else rows.student_row)[6])
    if value == "row":
        x[b, pos] = float("-inf")
        match = f"{side} logits at batch {b}, position {pos} are -inf in every vocabulary column"
    else:
        x[b, pos, 2] = value
        match = f"{side} logits contain NaN or inf at batch {b}, position {pos}"
    s, t = (x, batch["teacher"]) if side == "student" else (batch["student"], x)
    for mapping in ["projection", "uld", "hybrid"]:
        with pytest.raises(ValueError, match=match):
            CrossTokenizerKDLoss(table=TABLE, mapping=mapping)(s, t, batch["alignment"])


def test_token_kd_loss_accepts_banned_teacher_tokens():
    t, s = _logp_pair(3, teacher_zeros=5)
    for kind in ["fkl", "jsd", "skl", "tvd", "srkl"]:
        val = token_kd_loss(s, t, divergence_name=kind)
        ref = torch.stack([ref_divergence(torch.softmax(t[i], -1), torch.softmax(s[i], -1), kind)
                           for i in range(t.shape[0])]).mean()
        torch.testing.assert_close(val, ref, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="NaN or \\+inf"):
        token_kd_loss(s, t.masked_fill(t == t.max(), float("nan")))


@pytest.mark.parametrize("temperature", [math.inf, 0.0, -1.0, math.nan, "2", True])
def test_bad_temperature_raises(temperature):
    with pytest.raises(ValueError, match=f"temperature must be a finite number > 0, got {temperature!r}"):
        CrossTokenizerKDLoss(table=TABLE, temperature=temperature)
    t = torch.randn(3, 7)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        token_kd_loss(t, t, temperature=temperature)


@pytest.mark.parametrize("count", [0, -3, math.nan, 2.5, True, torch.tensor(0), torch.tensor(-1),
                                   torch.tensor(2.5), torch.tensor(float("nan")), torch.tensor([3, 4]), "8"])
def test_bad_num_items_in_batch_raises(batch, count):
    with pytest.raises(ValueError, match="num_items_in_batch") as err:
        CrossTokenizerKDLoss(table=TABLE)(batch["student"], batch["teacher"], batch["alignment"],
                                          num_items_in_batch=count)
    if not isinstance(count, torch.Tensor):
        assert repr(count) in str(err.value)
    t = torch.randn(3, 7)
    with pytest.raises(ValueError, match="num_items_in_batch"):
        token_kd_loss(t, t, num_items_in_batch=count)


@pytest.mark.parametrize("count", [7, np.int64(7), torch.tensor(7), torch.tensor(7.0), torch.tensor([7])])
def test_num_items_in_batch_divides(batch, count):
    loss = CrossTokenizerKDLoss(table=TABLE, reduction="sum")(batch["student"], batch["teacher"], batch["alignment"])
    got = CrossTokenizerKDLoss(table=TABLE)(batch["student"], batch["teacher"], batch["alignment"],
                                           num_items_in_batch=count)
    torch.testing.assert_close(got.loss, loss.loss / 7, rtol=1e-12, atol=0)


# ================================================================ item 18: wrong shapes and types, clear errors
@pytest.mark.parametrize("which, shape_of", [("student_input_ids", lambda x: x[:, :-3]),
                                             ("teacher_input_ids", lambda x: x[0]),
                                             ("student_input_ids", lambda x: torch.cat([x, x[:1]]))])
def test_merge_with_wrong_shaped_ids_raises(batch, which, shape_of):
    ids = dict(student_input_ids=batch["student_ids"], teacher_input_ids=batch["teacher_ids"])
    ids[which] = shape_of(ids[which])
    with pytest.raises(ValueError) as err:
        CrossTokenizerKDLoss(table=TABLE, mapping="uld", merge="observed")(batch["student"], batch["teacher"],
                                                                           batch["alignment"], **ids)
    msg = str(err.value)
    assert which in msg and str(tuple(ids[which].shape)) in msg and "collator" in msg


def test_merge_with_label_ids_raises(batch):
    labels = batch["student_ids"].clone()
    labels[:, 5:] = -100
    with pytest.raises(ValueError, match="token id -100 at batch"):
        CrossTokenizerKDLoss(table=TABLE, mapping="uld", merge="observed")(
            batch["student"], batch["teacher"], batch["alignment"], student_input_ids=labels,
            teacher_input_ids=batch["teacher_ids"])
    with pytest.raises(TypeError, match="integer"):
        CrossTokenizerKDLoss(table=TABLE, mapping="uld", merge="observed")(
            batch["student"], batch["teacher"], batch["alignment"], student_input_ids=batch["student_ids"].float(),
            teacher_input_ids=batch["teacher_ids"])


def test_collator_batch_dict_is_accepted(gpt2, mistral, qwen, gpt2_mistral):
    from xtok_kd.data import CrossTokenizerCollator

    texts = [corpus_text()[:150], corpus_text()[300:420]]
    out = CrossTokenizerCollator(gpt2, mistral)([{"text": t} for t in texts])
    lt, ls = out["teacher_input_ids"].shape[1], out["student_input_ids"].shape[1]
    s, t = _logits(2, ls, mistral.vocab_size, 0), _logits(2, lt, gpt2.vocab_size, 1)
    for kw in [dict(mapping="projection"), dict(mapping="uld", merge="observed")]:
        loss = CrossTokenizerKDLoss(table=gpt2_mistral, **kw)
        a = loss(s, t, out).loss
        b = loss(s, t, out["alignment"], student_input_ids=out["student_input_ids"],
                 teacher_input_ids=out["teacher_input_ids"]).loss
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    other = CrossTokenizerCollator(qwen, mistral)([{"text": t} for t in texts])  # the wrong collator for the table
    with pytest.raises(ValueError, match=f"teacher tokenizer has fingerprint {qwen.fingerprint}"):
        CrossTokenizerKDLoss(table=gpt2_mistral)(s, t, other)
    with pytest.raises(TypeError, match=r"batch\['alignment'\]"):
        CrossTokenizerKDLoss(table=gpt2_mistral)(s, t, {k: v for k, v in out.items() if k != "alignment"})
    with pytest.raises(TypeError, match=r"got list; pass batch\['alignment'\]"):
        CrossTokenizerKDLoss(table=gpt2_mistral)(s, t, [out["alignment"]])


@pytest.mark.parametrize("side, cut", [("student", "batch"), ("teacher", "batch"), ("student", "length"),
                                       ("teacher", "length")])
def test_logits_not_fitting_the_alignment_raise(batch, side, cut):
    x = batch[side]
    x = x[:2] if cut == "batch" else x[:, :3]
    s, t = (x, batch["teacher"]) if side == "student" else (batch["student"], x)
    with pytest.raises(ValueError, match=f"{side} logits {re_shape(x)} do not fit the alignment"):
        CrossTokenizerKDLoss(table=TABLE)(s, t, batch["alignment"])


def re_shape(x):
    return re.escape(str(tuple(x.shape)))


@pytest.mark.parametrize("kw, match", [
    (dict(beta=math.nan), "beta must lie in"),
    (dict(alpha="0.1"), "alpha must lie in"),
    (dict(mu=0.0), "mu must lie in"),
    (dict(chunk_size=True), "chunk_size"),
    (dict(mapping="uld", top_k=True), "top_k"),
    (dict(mapping="hybrid", hybrid_weights=(-1.0, 2.0)), "hybrid_weights"),
    (dict(mapping="hybrid", hybrid_prob_floor=0.0), "hybrid_prob_floor"),
    (dict(scale_by_temperature_sq="yes"), "scale_by_temperature_sq"),
    (dict(teacher_vocab_size=VT + 1), "contradicts"),
])
def test_bad_constructor_arguments_raise_with_value(kw, match):
    with pytest.raises(ValueError, match=match) as err:
        CrossTokenizerKDLoss(table=TABLE, **kw)
    assert repr(next(v for k, v in kw.items() if k != "mapping")) in str(err.value) or "contradicts" in str(err.value)


@pytest.mark.parametrize("kw", [dict(mapping="projection"), dict(mapping="uld"), dict(mapping="hybrid"),
                                dict(mapping="uld", merge="observed")])
def test_nothing_to_align_is_a_connected_zero_with_topk_and_num_items(batch, kw):
    al = batch["alignment"].with_loss_mask(np.zeros(batch["alignment"].num_chunks, dtype=bool))
    s = batch["student"].detach().clone().requires_grad_()
    out = CrossTokenizerKDLoss(table=TABLE, **kw)(s, batch["teacher"], al, num_items_in_batch=torch.tensor(5),
                                                  student_input_ids=batch["student_ids"],
                                                  teacher_input_ids=batch["teacher_ids"])
    assert float(out.loss.detach()) == 0.0 and out.loss.requires_grad
    out.loss.backward()
    assert bool((s.grad == 0).all())
    if kw["mapping"] != "hybrid":
        topk = TeacherTopK(*(lambda v: (v.indices, v.values))(torch.log_softmax(batch["teacher"][..., :VT], -1)
                                                               .topk(4, -1)))
        out = CrossTokenizerKDLoss(table=TABLE, **kw)(s, topk, al, student_input_ids=batch["student_ids"],
                                                      teacher_input_ids=batch["teacher_ids"])
        assert float(out.loss.detach()) == 0.0 and out.loss.requires_grad


def test_shifted_log_normaliser_matches_logsumexp_including_overflow_and_infinities():
    from xtok_kd.losses.mappings.projection import _lse_shifted

    torch.manual_seed(0)
    u = torch.randn(6, 1000, dtype=torch.float64) * 5
    support = torch.arange(0, 1000, 3)
    shift = torch.logsumexp(u[:, support], -1)
    u[1, 1] = shift[1] + 200.0  # a logit outside the support far above it: exp overflows, the row is redone
    u[2, 2] = float("inf")  # +inf outside the support: the normaliser is +inf
    u[3, support] = float("-inf")  # no mass on the support: the shift is -inf
    shift = torch.logsumexp(u[:, support], -1)
    got, want = _lse_shifted(u.clone(), shift), torch.logsumexp(u, -1)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    finite = torch.isfinite(want)
    assert torch.allclose(got[finite], want[finite], rtol=0, atol=1e-12)
    got32 = _lse_shifted(u.float(), shift.float())
    assert torch.allclose(got32[finite].double(), want[finite], rtol=0, atol=1e-4)
