"""Each divergence against its formula on hand-made cases, and against the float64 reference on random rows."""

from __future__ import annotations

import math
from typing import get_args

import pytest
import torch

from reference import ref_divergence
from xtok_kd.losses import divergence, reduce_rows, token_kd_loss
from xtok_kd.losses.divergences import DIVERGENCES, LOG_FLOOR, DivergenceName

# The kinds reference.ref_divergence knows. "dkl" is left out deliberately: its own O(V^2) pairwise reference, its
# equality with fkl and its knobs are tested in test_divergences_dkl.py; it joins the generic checks via ALL_KINDS.
KINDS = ["fkl", "rkl", "jsd", "tvd", "skl", "srkl", "akl", "symmetric_kl"]
ALL_KINDS = [*KINDS, "dkl"]


def test_kind_lists_cover_every_divergence():
    assert sorted(ALL_KINDS) == sorted(get_args(DivergenceName)) == sorted(DIVERGENCES)


def logp(*probs: float) -> torch.Tensor:
    p = torch.tensor([probs], dtype=torch.float64)
    return torch.where(p > 0, p.log(), torch.full_like(p, LOG_FLOOR))


P, Q = logp(0.5, 0.5), logp(0.25, 0.75)
KL_PQ = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
KL_QP = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
ONE, TWO = logp(1.0, 0.0), logp(0.0, 1.0)


@pytest.mark.parametrize(
    "kind, t, s, knobs, expected",
    [
        ("fkl", P, Q, {}, KL_PQ),
        ("rkl", P, Q, {}, KL_QP),
        ("symmetric_kl", P, Q, {}, KL_PQ + KL_QP),
        ("tvd", P, Q, {}, 0.25),
        ("tvd", ONE, TWO, {}, 1.0),
        ("jsd", ONE, TWO, {"beta": 0.5}, math.log(2.0)),  # disjoint supports: JSD = log 2
        ("jsd", P, Q, {"beta": 0.0}, KL_PQ),  # GKD convention at the end points
        ("jsd", P, Q, {"beta": 1.0}, KL_QP),
        ("skl", ONE, TWO, {"alpha": 0.1}, math.log(10.0)),  # KL(p || 0.1 p + 0.9 q) = log 10
        ("srkl", ONE, TWO, {"alpha": 0.1}, math.log(10.0)),
        ("skl", P, Q, {"alpha": 0.0}, KL_PQ),
        ("fkl", ONE, ONE, {}, 0.0),
    ],
)
def test_hand_made_cases(kind, t, s, knobs, expected):
    got = divergence(t, s, kind=kind, **knobs)
    assert got.shape == (1,)
    assert float(got) == pytest.approx(expected, abs=1e-12)


def test_jsd_generic_beta_matches_formula():
    beta = 0.3
    p, q = torch.tensor([0.5, 0.5], dtype=torch.float64), torch.tensor([0.25, 0.75], dtype=torch.float64)
    m = beta * p + (1 - beta) * q
    expected = beta * (p * (p / m).log()).sum() + (1 - beta) * (q * (q / m).log()).sum()
    assert float(divergence(P, Q, kind="jsd", beta=beta)) == pytest.approx(float(expected), abs=1e-12)


def test_akl_hand_made():
    # p sorted: 0.6 | 0.3, 0.1 -> head {0} for mu = 0.5; gaps 0.4 | 0.2 + 0.2: equal weights.
    t, s = logp(0.6, 0.3, 0.1), logp(0.2, 0.5, 0.3)
    p, q = t.exp()[0], s.exp()[0]
    fkl = float((p * (p / q).log()).sum())
    rkl = float((q * (q / p).log()).sum())
    assert float(divergence(t, s, kind="akl", mu=0.5)) == pytest.approx(0.5 * fkl + 0.5 * rkl, abs=1e-12)
    # mu = 0.95 puts every column with mass before it < 0.95 in the head: all three -> pure forward KL.
    assert float(divergence(t, s, kind="akl", mu=0.95)) == pytest.approx(fkl, abs=1e-12)


def test_akl_long_head_falls_back_to_full_sort():
    torch.manual_seed(1)
    v = 600  # flat teacher: the head needs > 256 columns
    t = torch.log_softmax(torch.randn(3, v, dtype=torch.float64) * 0.01, -1)
    s = torch.log_softmax(torch.randn(3, v, dtype=torch.float64), -1)
    got = divergence(t, s, kind="akl", mu=0.6)
    ref = torch.stack([ref_divergence(t[i].exp(), s[i].exp(), "akl", mu=0.6) for i in range(3)])
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_random_rows_match_reference_values_and_gradients(kind):
    torch.manual_seed(0)
    t = torch.log_softmax(torch.randn(7, 123, dtype=torch.float64) * 2, -1)
    s_logits = (torch.randn(7, 123, dtype=torch.float64) * 2).requires_grad_()
    got = divergence(t, torch.log_softmax(s_logits, -1), kind=kind, beta=0.3, alpha=0.2, mu=0.4)
    ref = torch.stack([
        ref_divergence(t[i].exp(), torch.softmax(s_logits[i], -1), kind, beta=0.3, alpha=0.2, mu=0.4) for i in range(7)
    ])
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    g, = torch.autograd.grad(got.sum(), s_logits)
    gr, = torch.autograd.grad(ref.sum(), s_logits)
    torch.testing.assert_close(g, gr, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_zero_when_equal_and_nonnegative(kind):
    torch.manual_seed(2)
    t = torch.log_softmax(torch.randn(5, 31, dtype=torch.float64), -1)
    s = torch.log_softmax(torch.randn(5, 31, dtype=torch.float64), -1)
    assert torch.allclose(divergence(t, t, kind=kind), torch.zeros(5, dtype=torch.float64), atol=1e-12)
    assert bool((divergence(t, s, kind=kind) > 0).all())


def test_floor_columns_give_finite_values_and_gradients():
    t = logp(0.7, 0.3, 0.0)
    s = logp(0.2, 0.3, 0.5).requires_grad_()
    for kind in ["jsd", "tvd", "skl", "srkl", "fkl", "dkl"]:
        val = divergence(t, s, kind=kind)
        (g,) = torch.autograd.grad(val.sum(), s)
        assert torch.isfinite(val).all() and torch.isfinite(g).all(), kind


def test_unknown_divergence_lists_allowed():
    with pytest.raises(ValueError, match="fkl.*symmetric_kl"):
        divergence(P, Q, kind="kl")  # type: ignore[arg-type]


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="same shape"):
        divergence(P, logp(0.2, 0.3, 0.5), kind="fkl")


def test_reduce_rows():
    v = torch.tensor([1.0, 2.0, 3.0])
    assert float(reduce_rows(v, reduction="mean")) == 2.0
    assert float(reduce_rows(v, reduction="sum")) == 6.0
    assert float(reduce_rows(v, reduction="mean", num_items_in_batch=12)) == 0.5
    assert torch.equal(reduce_rows(v, reduction="none"), v)
    assert float(reduce_rows(v[:0], reduction="mean")) == 0.0
    with pytest.raises(ValueError, match="'mean', 'sum', 'none'"):
        reduce_rows(v, reduction="batchmean")  # type: ignore[arg-type]


def test_token_kd_loss_temperature_and_mask():
    torch.manual_seed(3)
    s = torch.randn(2, 5, 17, dtype=torch.float64)
    t = torch.randn(2, 5, 17, dtype=torch.float64)
    mask = torch.rand(2, 5) > 0.3
    T = 2.0
    got = token_kd_loss(s, t, mask, divergence_name="fkl", temperature=T)
    rows = [ref_divergence(torch.softmax(t[b, i] / T, -1), torch.softmax(s[b, i] / T, -1), "fkl")
            for b in range(2) for i in range(5) if mask[b, i]]
    assert float(got) == pytest.approx(float(torch.stack(rows).mean()) * T * T, rel=1e-12)
    with pytest.raises(ValueError, match="temperature"):
        token_kd_loss(s, t, temperature=0.0)
