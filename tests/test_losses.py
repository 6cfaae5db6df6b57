"""CrossTokenizerKDLoss against the float64 reference (values and gradients), the engine's gradcheck, chunking,
bad input. Odd shapes (3 samples, ~47 rows, V = 123 / 131) and random loss masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reference import FakeTable, dense_projection, ref_loss
from xtok_kd.losses import CrossTokenizerKDLoss, TeacherTopK, token_kd_loss
from xtok_kd.sequence import align_spans

VT, VS = 131, 123


def random_spans(rng: np.random.Generator, nbytes: int, density: float) -> np.ndarray:
    cuts = np.sort(rng.choice(np.arange(1, nbytes), size=int(density * nbytes), replace=False))
    b = np.concatenate([[0], cuts, [nbytes]])
    return np.stack([b[:-1], b[1:]], 1)


def with_bos(spans: np.ndarray) -> np.ndarray:
    return np.concatenate([[[0, 0]], spans])


@pytest.fixture(scope="module")
def batch():
    """3 texts of 70/50/90 bytes; the student has a BOS, the teacher does not (its first chunk is dropped)."""
    rng = np.random.default_rng(0)
    sizes = [70, 50, 90]
    t = [random_spans(rng, n, 0.55) for n in sizes]
    s = [with_bos(random_spans(rng, n, 0.5)) for n in sizes]
    al = align_spans(t, s)
    al = al.with_loss_mask(rng.random(al.num_chunks) < 0.8)
    b, lt, ls = 3, al.teacher_chunk.shape[1], al.student_chunk.shape[1]
    g = torch.Generator().manual_seed(0)
    return dict(
        alignment=al,
        student=torch.randn(b, ls, VS + 5, dtype=torch.float64, generator=g) * 2,
        teacher=torch.randn(b, lt, VT + 7, dtype=torch.float64, generator=g) * 2,
        student_ids=torch.randint(0, VS, (b, ls), generator=g),
        teacher_ids=torch.randint(0, VT, (b, lt), generator=g),
    )


TABLE = FakeTable(VT, VS, seed=1)


def run(batch, dtype=torch.float64, **kw):
    loss = CrossTokenizerKDLoss(table=TABLE, **kw)
    s = batch["student"].detach().to(dtype).clone().requires_grad_()
    out = loss(s, batch["teacher"].to(dtype), batch["alignment"], student_input_ids=batch["student_ids"],
               teacher_input_ids=batch["teacher_ids"])
    (g,) = torch.autograd.grad(out.loss.sum(), s)
    return out, g


def reference(batch, *, mapping, divergence="fkl", temperature=1.0, merge="none", direction="student_to_teacher",
              top_k=None, reduction="mean", **kw):
    s = batch["student"].clone().requires_grad_()
    proj = None
    if mapping == "projection":
        src, dst, w = TABLE.projection(direction)
        n_src, n_dst = (VS, VT) if direction == "student_to_teacher" else (VT, VS)
        proj = dense_projection(src, dst, w, n_src, n_dst)
    val = ref_loss(s, batch["teacher"], batch["alignment"], mapping=mapping, kind=divergence, T=temperature,
                   merge=merge, proj=proj, direction=direction, matched=(TABLE.exact_teacher, TABLE.exact_student),
                   top_k=top_k, student_ids=batch["student_ids"], teacher_ids=batch["teacher_ids"], vt=VT, vs=VS,
                   reduction=reduction, **kw)
    (g,) = torch.autograd.grad(val.sum(), s)
    return val, g


CASES = (
    [dict(mapping="projection", divergence=d) for d in ["fkl", "rkl", "jsd", "tvd", "skl", "srkl", "akl", "symmetric_kl"]]
    + [dict(mapping="projection", divergence=d, direction="teacher_to_student") for d in ["fkl", "rkl", "akl"]]
    + [dict(mapping="projection", divergence="fkl", temperature=2.0)]
    + [dict(mapping="uld", merge=m) for m in ["none", "observed", "bayesian"]]
    + [dict(mapping="uld", top_k=7), dict(mapping="uld", top_k=7, merge="observed")]
    + [dict(mapping="hybrid", divergence="jsd", merge=m) for m in ["none", "observed", "bayesian"]]
    + [dict(mapping="hybrid", divergence="fkl", temperature=1.5)]
)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_matches_float64_reference(batch, case):
    out, g = run(batch, block_rows=5, **case)
    ref, gr = reference(batch, **case)
    assert out.metrics["chunks"] > 20
    torch.testing.assert_close(out.loss, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g, gr, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_reductions_match_reference(batch, reduction):
    out, g = run(batch, mapping="uld", merge="observed", reduction=reduction)
    ref, gr = reference(batch, mapping="uld", merge="observed", reduction=reduction)
    torch.testing.assert_close(out.loss, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g, gr, rtol=1e-8, atol=1e-11)


def test_num_items_in_batch(batch):
    summed, _ = run(batch, mapping="projection", reduction="sum")
    loss = CrossTokenizerKDLoss(table=TABLE, mapping="projection")
    out = loss(batch["student"], batch["teacher"], batch["alignment"], num_items_in_batch=40)
    torch.testing.assert_close(out.loss, summed.loss / 40)


@pytest.mark.parametrize("case", [dict(mapping="projection", divergence="akl"), dict(mapping="uld", merge="observed"),
                                  dict(mapping="hybrid", divergence="jsd", merge="bayesian"),
                                  dict(mapping="uld", top_k=3)], ids=str)
def test_chunked_equals_unchunked_fp32(batch, case):
    a, ga = run(batch, dtype=torch.float32, block_rows=1, **case)
    b, gb = run(batch, dtype=torch.float32, block_rows=100_000, **case)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-8)
    assert a.metrics == pytest.approx(b.metrics, rel=1e-5)


@pytest.mark.parametrize("case", [dict(mapping="projection", divergence="jsd"), dict(mapping="uld", merge="observed"),
                                  dict(mapping="hybrid", divergence="fkl", merge="bayesian")], ids=str)
def test_gradcheck_engine(case):
    rng = np.random.default_rng(5)
    al = align_spans([random_spans(rng, 12, 0.5)], [with_bos(random_spans(rng, 12, 0.5))])
    table = FakeTable(11, 9, seed=2)
    lt, ls = al.teacher_chunk.shape[1], al.student_chunk.shape[1]
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(1, lt, 11, dtype=torch.float64, generator=g)
    sid, tid = torch.randint(0, 9, (1, ls), generator=g), torch.randint(0, 11, (1, lt), generator=g)
    loss = CrossTokenizerKDLoss(table=table, block_rows=2, reduction="none", **case)
    student = torch.randn(1, ls, 9, dtype=torch.float64, generator=g, requires_grad=True)
    fn = lambda s: loss(s, teacher, al, student_input_ids=sid, teacher_input_ids=tid).loss  # noqa: E731
    assert fn(student).shape[0] >= 3
    assert torch.autograd.gradcheck(fn, (student,), eps=1e-6, atol=1e-7)


def test_same_tokenizer_projection_fkl_equals_token_kd():
    """Identity table and identical spans: every token is a chunk, projection-FKL is plain token-level KL."""
    rng = np.random.default_rng(3)
    spans = [with_bos(random_spans(rng, 80, 0.5)), with_bos(random_spans(rng, 60, 0.5))]
    al = align_spans(spans, spans)
    v = 123
    table = FakeTable(v, v, identity=True)
    length = al.student_chunk.shape[1]
    g = torch.Generator().manual_seed(4)
    s = torch.randn(2, length, v, generator=g) * 3
    t = torch.randn(2, length, v, generator=g) * 3
    loss = CrossTokenizerKDLoss(table=table, mapping="projection", divergence="fkl", temperature=2.0)
    out = loss(s, t, al)
    rows = torch.as_tensor(al.rows().student_row)
    samples = torch.as_tensor(al.rows().sample)
    mask = torch.zeros(2, length, dtype=torch.bool)
    mask[samples, rows] = True
    plain = token_kd_loss(s, t, mask, divergence_name="fkl", temperature=2.0)
    assert out.metrics["teacher_mass_mapped"] == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(out.loss, plain, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("dtype, rtol", [(torch.bfloat16, 1e-5), (torch.float16, 1e-5)])
def test_half_inputs_compute_in_fp32(batch, dtype, rtol):
    rounded = {**batch, "student": batch["student"].to(dtype).double(), "teacher": batch["teacher"].to(dtype).double()}
    out, g = run(batch, dtype=dtype, mapping="projection", divergence="fkl")
    ref, gr = reference(rounded, mapping="projection", divergence="fkl")
    assert out.loss.dtype == torch.float32 and g.dtype == dtype
    torch.testing.assert_close(out.loss.double(), ref, rtol=rtol, atol=1e-6)
    # The gradient is returned in the input dtype: its rounding is the only error.
    torch.testing.assert_close(g.double(), gr, rtol=1e-2 if dtype == torch.bfloat16 else 1e-3, atol=1e-4)


def test_padded_width_is_sliced(batch):
    out, g = run(batch, mapping="uld")
    assert torch.all(g[..., VS:] == 0)
    sliced = {**batch, "student": batch["student"][..., :VS], "teacher": batch["teacher"][..., :VT]}
    out2, g2 = run(sliced, mapping="uld")
    torch.testing.assert_close(out.loss, out2.loss, rtol=0, atol=0)
    torch.testing.assert_close(g[..., :VS], g2, rtol=0, atol=0)


def test_narrower_logits_name_both_numbers(batch):
    loss = CrossTokenizerKDLoss(table=TABLE)
    with pytest.raises(ValueError, match=r"120 columns.*123 ids"):
        loss(batch["student"][..., :120], batch["teacher"], batch["alignment"])


def test_nan_logits_raise(batch):
    s = batch["student"].clone()
    rows = batch["alignment"].rows(only_loss=True)
    s[int(rows.sample[3]), int(rows.student_row[3]), 5] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        CrossTokenizerKDLoss(table=TABLE)(s, batch["teacher"], batch["alignment"])


@pytest.mark.parametrize("mapping", ["projection", "uld", "hybrid"])
def test_empty_alignment_is_a_connected_zero(batch, mapping):
    al = batch["alignment"].with_loss_mask(np.zeros(batch["alignment"].num_chunks, dtype=bool))
    s = batch["student"].detach().float().clone().requires_grad_()
    out = CrossTokenizerKDLoss(table=TABLE, mapping=mapping)(s, batch["teacher"].float(), al)
    assert float(out.loss.detach()) == 0.0 and out.loss.requires_grad
    out.loss.backward()
    assert s.grad is not None and torch.all(s.grad == 0)


def test_top_k_larger_than_vocab_is_clamped_to_exact(batch):
    exact, g1 = run(batch, mapping="uld")
    big, g2 = run(batch, mapping="uld", top_k=10_000)
    torch.testing.assert_close(exact.loss, big.loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)
    assert big.metrics["uld_bound"] == 0.0


def test_topk_bound_brackets_exact(batch):
    exact, _ = run(batch, mapping="uld", reduction="none")
    approx, _ = run(batch, mapping="uld", top_k=4, reduction="none")
    assert bool((approx.loss <= exact.loss + 1e-12).all())
    assert approx.metrics["uld_bound"] > 0
    # per-chunk: exact <= approx + bound (mean bound reported; check the mean relation)
    assert float((exact.loss - approx.loss).detach().mean()) <= approx.metrics["uld_bound"] + 1e-12


def test_teacher_topk_input(batch):
    t = batch["teacher"][..., :VT]
    full_k = TeacherTopK(*(lambda v: (v.indices, v.values))(torch.log_softmax(t, -1).topk(VT, -1)))
    a, ga = run(batch, mapping="projection", divergence="fkl")
    # teacher_tail=False: the top-k renormalised over the reachable columns, as full logits are
    loss = CrossTokenizerKDLoss(table=TABLE, mapping="projection", divergence="fkl", teacher_tail=False)
    s = batch["student"].clone().requires_grad_()
    b = loss(s, full_k, batch["alignment"])
    (gb,) = torch.autograd.grad(b.loss, s)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ga, gb, rtol=1e-8, atol=1e-11)
    k = 9
    topk = TeacherTopK(*(lambda v: (v.indices, v.values))(torch.log_softmax(t, -1).topk(k, -1)))
    u1, _ = run(batch, mapping="uld", top_k=k)
    u2 = CrossTokenizerKDLoss(table=TABLE, mapping="uld", top_k=k)(batch["student"], topk, batch["alignment"])
    torch.testing.assert_close(u1.loss, u2.loss, rtol=1e-10, atol=1e-12)
    x = CrossTokenizerKDLoss(table=TABLE, mapping="projection")(batch["student"], topk, batch["alignment"])
    assert 0 < x.metrics["teacher_mass_mapped"] < 1 and torch.isfinite(x.loss)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(mapping="wasserstein"), "'projection', 'uld', 'hybrid'"),
        (dict(divergence="kl"), "'fkl'"),
        (dict(merge="first"), "'none', 'observed', 'bayesian'"),
        (dict(reduction="batchmean"), "'mean', 'sum', 'none'"),
        (dict(direction="both"), "student_to_teacher"),
        (dict(temperature=0.0), "temperature"),
        (dict(top_k=5), "top_k applies to mapping='uld'"),
        (dict(mapping="projection", merge="observed"), "merge must be 'none'"),
        (dict(chunk_size=0), "chunk_size"),
    ],
)
def test_bad_options_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        CrossTokenizerKDLoss(table=TABLE, **kw)


def test_projection_needs_table():
    with pytest.raises(ValueError, match="needs table"):
        CrossTokenizerKDLoss(mapping="projection")


def test_merge_needs_ids(batch):
    with pytest.raises(ValueError, match="student_input_ids"):
        CrossTokenizerKDLoss(table=TABLE, mapping="uld", merge="observed")(batch["student"], batch["teacher"],
                                                                           batch["alignment"])


def test_table_tensors_are_buffers():
    loss = CrossTokenizerKDLoss(table=TABLE, mapping="projection")
    names = {n for n, _ in loss.named_buffers()}
    assert {"projection_src", "projection_dst", "projection_weight"} <= names
    hybrid = CrossTokenizerKDLoss(table=TABLE, mapping="hybrid")
    assert {"teacher_matched", "student_matched"} <= {n for n, _ in hybrid.named_buffers()}


def test_metrics_report_alignment(batch):
    out, _ = run(batch, mapping="projection")
    al = batch["alignment"]
    assert out.metrics["aligned_share"] == pytest.approx(al.aligned_share)
    assert out.metrics["dropped_chunks"] == al.dropped_chunks
    assert out.metrics["chunks"] == len(al.rows(only_loss=True))


@pytest.mark.parametrize("direction", ["student_to_teacher", "teacher_to_student"])
def test_unit_weight_table_with_unmapped_ids(batch, direction):
    """One unit-weight entry per source id, some ids unmapped: the dense spare-column form of the projection."""
    table = FakeTable(VT, VS, seed=7, unmapped=9, extra=0)
    loss = CrossTokenizerKDLoss(table=table, mapping="projection", divergence="jsd", direction=direction)
    assert loss.projection_weight is None  # the fast form was taken
    s = batch["student"].clone().requires_grad_()
    out = loss(s, batch["teacher"], batch["alignment"])
    (g,) = torch.autograd.grad(out.loss, s)
    src, dst, w = table.projection(direction)
    n_src, n_dst = (VS, VT) if direction == "student_to_teacher" else (VT, VS)
    s2 = batch["student"].clone().requires_grad_()
    ref = ref_loss(s2, batch["teacher"], batch["alignment"], mapping="projection", kind="jsd",
                   proj=dense_projection(src, dst, w, n_src, n_dst), direction=direction, vt=VT, vs=VS)
    (gr,) = torch.autograd.grad(ref, s2)
    torch.testing.assert_close(out.loss, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g, gr, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("mapping, side, value", [("projection", "teacher", float("inf")),
                                                  ("uld", "student", float("nan")),
                                                  ("projection", "student", float("inf")),
                                                  ("hybrid", "teacher", float("nan"))])
def test_non_finite_logits_raise_with_position(batch, mapping, side, value):
    rows = batch["alignment"].rows(only_loss=True)
    s, t = batch["student"].clone(), batch["teacher"].clone()
    b = int(rows.sample[5])
    if side == "student":
        s[b, int(rows.student_row[5]), 3] = value
        pos = int(rows.student_row[5])
    else:
        t[b, int(rows.teacher_row[5]), 3] = value
        pos = int(rows.teacher_row[5])
    with pytest.raises(ValueError, match=f"{side} logits contain NaN or inf at batch {b}, position {pos}"):
        CrossTokenizerKDLoss(table=TABLE, mapping=mapping)(s, t, batch["alignment"])


def test_minus_inf_is_probability_zero_where_defined(batch):
    """-inf (a ruled-out token) is probability 0: the sorted L1 is defined and finite (every divergence and mapping:
    tests/test_losses_hardening.py)."""
    rows = batch["alignment"].rows(only_loss=True)
    s = batch["student"].clone()
    s[int(rows.sample[2]), int(rows.student_row[2]), 4] = float("-inf")
    out = CrossTokenizerKDLoss(table=TABLE, mapping="uld")(s, batch["teacher"], batch["alignment"])
    assert torch.isfinite(out.loss)


def test_chunk_size_is_a_deprecated_name_of_block_rows(batch):
    with pytest.warns(FutureWarning, match="block_rows"):
        old = CrossTokenizerKDLoss(table=TABLE, chunk_size=3)
    assert old.block_rows == 3 and old.chunk_size == 3
    new = CrossTokenizerKDLoss(table=TABLE, block_rows=3)
    a = old(batch["student"], batch["teacher"], batch["alignment"]).loss
    b = new(batch["student"], batch["teacher"], batch["alignment"]).loss
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="block_rows only"):
        CrossTokenizerKDLoss(table=TABLE, chunk_size=3, block_rows=5)


def test_a_new_mapping_is_one_class_and_one_registry_line(batch, monkeypatch):
    """The protocol: a MappingMethod subclass registered in MAPPINGS runs through the module and the engine."""
    from xtok_kd.losses.mappings import MAPPINGS
    from xtok_kd.losses.mappings.base import MappingMethod

    class MeanGap(MappingMethod):
        name = "mean_gap"
        metric_names = ("gap",)

        def buffers(self, table, teacher_vocab_size, student_vocab_size):
            return {"mean_gap_scale": torch.tensor(2.0)}

        def rows(self, block, buffers):
            s = torch.log_softmax(block.student_logits, -1).mean(-1)
            t = torch.log_softmax(block.teacher_logits, -1).mean(-1)
            gap = buffers["mean_gap_scale"] * (s - t) ** 2
            return gap, {"gap": gap.detach()}

    monkeypatch.setitem(MAPPINGS, "mean_gap", MeanGap)
    loss = CrossTokenizerKDLoss(table=TABLE, mapping="mean_gap", reduction="none")
    assert "mean_gap_scale" in dict(loss.named_buffers())
    s = batch["student"].clone().requires_grad_(True)
    out = loss(s, batch["teacher"], batch["alignment"])
    rows = batch["alignment"].rows(s.device, only_loss=True)
    b = rows.sample
    s_row = torch.log_softmax(s[b, rows.student_first - 1, :VS].to(s.dtype), -1).mean(-1)
    t_row = torch.log_softmax(batch["teacher"][b, rows.teacher_first - 1, :VT].to(s.dtype), -1).mean(-1)
    want = 2.0 * (s_row - t_row) ** 2
    torch.testing.assert_close(out.loss, want.detach(), rtol=1e-5, atol=1e-6)
    out.loss.sum().backward()
    ref = s.detach().clone().requires_grad_(True)
    r = torch.log_softmax(ref[b, rows.student_first - 1, :VS].to(s.dtype), -1).mean(-1)
    (2.0 * (r - t_row) ** 2).sum().backward()
    torch.testing.assert_close(s.grad, ref.grad, rtol=1e-5, atol=1e-6)
    assert out.metrics["gap"] == pytest.approx(float(want.mean()), rel=1e-5)


@pytest.mark.parametrize("mapping", ["projection", "hybrid"])
def test_decoupled_kl_at_its_kl_setting_equals_fkl_through_the_loss(batch, mapping):
    a, ga = run(batch, mapping=mapping, divergence="fkl")
    b, gb = run(batch, mapping=mapping, divergence="dkl")
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(ga, gb, rtol=1e-6, atol=1e-9)
    c, _ = run(batch, mapping=mapping, divergence="dkl", dkl_weights=(1.0, 1.0))
    assert float(c.loss) > float(a.loss)  # the pairwise term adds a non-negative amount
    with pytest.raises(ValueError, match="dkl_weights applies to divergence='dkl'"):
        CrossTokenizerKDLoss(table=TABLE, dkl_weights=(1.0, 1.0))
