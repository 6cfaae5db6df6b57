"""Decoupled KL (``kind="dkl"``): forward KL at its default weights (values and gradients), the O(V) form against a
brute-force O(V^2) pairwise reference at other weights, the paper's gradient theorem, zeros, bad knobs, large V."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from xtok_kd.losses.divergences import LOG_FLOOR, check_dkl_weights, divergence, dkl, fkl, token_kd_loss

NEG_INF = float("-inf")
KL_SETTING = (0.0, 1.0)


# ---------------------------------------------------------------- brute-force references (float64, V x V, per row)
def ref_pairwise_dkl(t: torch.Tensor, s: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """``alpha/4 sum_{j,k} S(p_j p_k)((t_j-t_k)-(s_j-s_k))^2 + beta sum_j S(p_j)(S(t_j)-s_j)`` on one row, over the
    teacher's support (``p > 0``) only; ``+inf`` where ``q = 0 < p``."""
    p = t.detach().exp()
    keep = p > 0
    if bool((s[keep] == NEG_INF).any()):
        return torch.tensor(math.inf, dtype=t.dtype)
    pk, tk, sk = p[keep], t[keep], s[keep]
    w = pk[:, None] * pk[None, :]
    gap = (tk[:, None] - tk[None, :]) - (sk[:, None] - sk[None, :])
    wmse = 0.25 * (w * gap**2).sum()
    ce = (pk * (tk.detach() - sk)).sum()
    return alpha * wmse + beta * ce


def ref_paper_dkl(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The paper's DKL at alpha = beta = 1: the student's gaps detached in the wMSE, plain soft-label cross-entropy."""
    p = t.detach().exp()
    w = p[:, None] * p[None, :]
    sd = s.detach()
    gap = (t[:, None] - t[None, :]) - (sd[:, None] - sd[None, :])
    return 0.25 * (w * gap**2).sum() - (p * s).sum()


def rows(n: int, v: int, scale: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g, dtype=torch.float64) * scale


def cases() -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, teacher logits, student logits): random, peaked, flat, -inf teacher columns, -inf on both sides."""
    out = [
        ("random", rows(6, 57, 2.0, 0), rows(6, 57, 2.0, 1)),
        ("peaked", rows(4, 40, 30.0, 2), rows(4, 40, 25.0, 3)),
        ("flat", rows(4, 300, 0.01, 4), rows(4, 300, 0.02, 5)),
        ("flat_vs_peaked", rows(3, 64, 0.01, 6), rows(3, 64, 20.0, 7)),
    ]
    t, s = rows(5, 33, 3.0, 8), rows(5, 33, 3.0, 9)
    t[:, ::4] = NEG_INF  # teacher rules tokens out, student does not
    out.append(("teacher_inf", t, s))
    t, s = rows(5, 33, 3.0, 10), rows(5, 33, 3.0, 11)
    t[:, 1::3] = NEG_INF
    s[:, 1::6] = NEG_INF  # student -inf only where the teacher is 0
    out.append(("both_inf", t, s))
    return out


def assert_same_as_fkl(t_logp, s_leaf, s_logp_fn, **knobs):
    got = divergence(t_logp, s_logp_fn(s_leaf), kind="dkl", **knobs)
    (g_got,) = torch.autograd.grad(got.sum(), s_leaf)
    want = fkl(t_logp, s_logp_fn(s_leaf))
    (g_want,) = torch.autograd.grad(want.sum(), s_leaf)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(g_got, g_want, rtol=0, atol=1e-6)
    assert torch.isfinite(g_got).all()
    return got


# ---------------------------------------------------------------- the KL setting is forward KL
@pytest.mark.parametrize("name, t_logits, s_logits", cases(), ids=[c[0] for c in cases()])
def test_kl_setting_equals_fkl_values_and_gradients(name, t_logits, s_logits):
    t = torch.log_softmax(t_logits, -1)
    # w.r.t. student logits (through log_softmax), by default and with the weights spelt out
    for knobs in ({}, {"dkl_weights": KL_SETTING}, {"dkl_weights": [0, 1]}):
        s_leaf = s_logits.clone().requires_grad_()
        got = assert_same_as_fkl(t, s_leaf, lambda x: torch.log_softmax(x, -1), **knobs)
        assert torch.isfinite(got).all()
    # w.r.t. student log-probabilities directly
    s_leaf = torch.log_softmax(s_logits, -1).requires_grad_()
    assert_same_as_fkl(t, s_leaf, lambda x: x)


def test_kl_setting_equals_fkl_on_floor_columns_and_unnormalised_rows():
    torch.manual_seed(12)
    t = torch.log_softmax(torch.randn(4, 20, dtype=torch.float64), -1)
    s = torch.log_softmax(torch.randn(4, 20, dtype=torch.float64), -1)
    t_floor = t.clone()
    t_floor[:, :5] = LOG_FLOOR  # outside the teacher's support
    s_floor = s.clone()
    s_floor[:, 15:] = LOG_FLOOR  # outside the student's support, where the teacher has mass: huge but finite
    merged = t + torch.rand(4, 1, dtype=torch.float64).log()  # GOLD-style rows summing to < 1
    for tt, ss in ((t_floor, s), (t, s_floor), (t_floor, s_floor), (merged, s)):
        s_leaf = ss.clone().requires_grad_()
        got = assert_same_as_fkl(tt, s_leaf, lambda x: x)
        assert torch.isfinite(got).all()


def test_kl_setting_keeps_fkl_infinities():
    # q = 0 < p: +inf, as forward KL, with a finite gradient
    t = torch.log_softmax(torch.tensor([[1.0, 2.0, 0.5]], dtype=torch.float64), -1)
    s_logits = torch.tensor([[0.3, NEG_INF, 1.0]], dtype=torch.float64, requires_grad=True)
    got = assert_same_as_fkl(t, s_logits, lambda x: torch.log_softmax(x, -1))
    assert got.item() == math.inf


# ---------------------------------------------------------------- other weights: the O(V^2) pairwise reference
@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.3, 2.0), (2.5, 0.0), (1e-3, 1.0)])
@pytest.mark.parametrize("name, t_logits, s_logits", cases(), ids=[c[0] for c in cases()])
def test_matches_pairwise_reference_values_and_gradients(weights, name, t_logits, s_logits):
    t_leaf = t_logits.clone().requires_grad_()
    s_leaf = s_logits.clone().requires_grad_()
    t, s = torch.log_softmax(t_leaf, -1), torch.log_softmax(s_leaf, -1)
    got = divergence(t, s, kind="dkl", dkl_weights=weights)
    ref = torch.stack([ref_pairwise_dkl(t[i], s[i], *weights) for i in range(t.shape[0])])
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)
    g_t, g_s = torch.autograd.grad(got.sum(), (t_leaf, s_leaf), retain_graph=True)
    r_t, r_s = torch.autograd.grad(ref.sum(), (t_leaf, s_leaf))
    torch.testing.assert_close(g_s, r_s, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(g_t, r_t, rtol=1e-8, atol=1e-9)
    assert torch.isfinite(g_s).all() and torch.isfinite(g_t).all()


def test_pairwise_reference_on_floor_columns_and_unnormalised_rows():
    torch.manual_seed(13)
    t = torch.log_softmax(torch.randn(3, 25, dtype=torch.float64), -1) + torch.rand(3, 1, dtype=torch.float64).log()
    t[:, :6] = LOG_FLOOR
    s = torch.log_softmax(torch.randn(3, 25, dtype=torch.float64), -1)
    s[:, 20:] = LOG_FLOOR  # the teacher has mass there: the gaps are ~1e4, the O(V) form must not cancel
    s = s.requires_grad_()
    got = dkl(t, s, dkl_weights=(0.7, 0.4))
    ref = torch.stack([ref_pairwise_dkl(t[i], s[i], 0.7, 0.4) for i in range(3)])
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-6)
    (g,) = torch.autograd.grad(got.sum(), s)
    (gr,) = torch.autograd.grad(ref.sum(), s)
    torch.testing.assert_close(g, gr, rtol=1e-10, atol=1e-6)


def test_wmse_is_half_the_teacher_weighted_variance_of_the_log_ratio():
    t = torch.log_softmax(rows(3, 50, 2.0, 14), -1)
    s = torch.log_softmax(rows(3, 50, 2.0, 15), -1)
    p, e = t.exp(), t - s
    var = (p * e**2).sum(-1) - (p * e).sum(-1) ** 2
    torch.testing.assert_close(dkl(t, s, dkl_weights=(1.0, 0.0)), 0.5 * var, rtol=1e-10, atol=1e-12)
    # invariant to a per-row shift of the student's log-probabilities (it compares logit gaps only)
    torch.testing.assert_close(dkl(t, s + 3.0, dkl_weights=(1.0, 0.0)), 0.5 * var, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- the paper's theorem, and what differs here
def test_paper_theorem_and_the_student_side_difference():
    t_leaf = rows(4, 30, 2.0, 16).requires_grad_()
    s_leaf = rows(4, 30, 2.0, 17).requires_grad_()

    def grads(values):
        return torch.autograd.grad(values.sum(), (t_leaf, s_leaf), retain_graph=True, materialize_grads=True)

    t, s = torch.log_softmax(t_leaf, -1), torch.log_softmax(s_leaf, -1)
    kl_t, kl_s = grads(fkl(t, s))
    # the paper: DKL (student gaps detached, alpha = beta = 1) has KL's gradients on both sides
    paper_t, paper_s = grads(torch.stack([ref_paper_dkl(t[i], s[i]) for i in range(4)]))
    torch.testing.assert_close(paper_t, kl_t, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(paper_s, kl_s, rtol=1e-9, atol=1e-12)
    # here (IKL's choice): the teacher side at alpha = 1 is the theorem's; the student also gets the wMSE's pull
    ours_t, ours_s = grads(dkl(t, s, dkl_weights=(1.0, 1.0)))
    torch.testing.assert_close(ours_t, kl_t, rtol=1e-9, atol=1e-12)
    _, wmse_s = grads(dkl(t, s, dkl_weights=(1.0, 0.0)))
    torch.testing.assert_close(ours_s, kl_s + wmse_s, rtol=1e-9, atol=1e-12)
    assert float(wmse_s.abs().max()) > 1e-3
    # at the KL setting the teacher (a constant in distillation) gets no gradient
    zero_t, _ = grads(dkl(t, s))
    assert float(zero_t.abs().max()) == 0.0


# ---------------------------------------------------------------- properties
logit_rows = st.integers(1, 3).flatmap(
    lambda n: st.integers(2, 24).flatmap(
        lambda v: st.tuples(
            st.lists(st.lists(st.floats(-20, 20), min_size=v, max_size=v), min_size=n, max_size=n),
            st.lists(st.lists(st.floats(-20, 20), min_size=v, max_size=v), min_size=n, max_size=n),
            st.lists(st.lists(st.booleans(), min_size=v, max_size=v), min_size=n, max_size=n),
        )
    )
)
weights = st.tuples(st.floats(0, 5), st.floats(0, 5)).filter(lambda w: w != (0.0, 0.0))


@settings(max_examples=80, deadline=None)
@given(data=logit_rows, w=weights)
def test_property_nonnegative_and_zero_on_identical_inputs(data, w):
    t_logits, s_logits, banned = (torch.tensor(x, dtype=torch.float64) for x in data)
    banned = banned.bool()
    banned[:, 0] = False  # every teacher row keeps one token
    t = torch.log_softmax(t_logits.masked_fill(banned, NEG_INF), -1)
    s = torch.log_softmax(s_logits, -1)  # the student rules nothing out: finite everywhere
    val = dkl(t, s, dkl_weights=w)
    assert torch.isfinite(val).all()
    assert bool((val >= -1e-9 * (1.0 + val.abs())).all()), val
    same = dkl(t, t, dkl_weights=w)
    assert float(same.abs().max()) <= 1e-12, same
    ref = torch.stack([ref_pairwise_dkl(t[i], s[i], *w) for i in range(t.shape[0])])
    torch.testing.assert_close(val, ref, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("w", [(1.0, 1.0), (1.0, 0.0), (0.0, 1.0), (0.5, 3.0)])
def test_zeros_give_finite_gradients_and_the_documented_infinities(w):
    # columns: p > 0 = q (inf) | both 0 | p = 0 < q | teacher LOG_FLOOR, student 0 | regular
    t_logits = torch.tensor([[1.0, NEG_INF, NEG_INF, 0.0, 0.5],
                             [1.0, NEG_INF, NEG_INF, 0.0, 0.5]], dtype=torch.float64, requires_grad=True)
    s_logits = torch.tensor([[NEG_INF, NEG_INF, 0.2, 0.3, 1.0],
                             [0.4, NEG_INF, 0.2, 0.3, 1.0]], dtype=torch.float64, requires_grad=True)
    t, s = torch.log_softmax(t_logits, -1), torch.log_softmax(s_logits, -1)
    val = dkl(t, s, dkl_weights=w)
    assert not torch.isnan(val).any()
    assert val[0].item() == math.inf  # q = 0 < p: +inf for any weights
    assert math.isfinite(val[1].item())
    g_t, g_s = torch.autograd.grad(val.sum(), (t_logits, s_logits), materialize_grads=True)
    assert torch.isfinite(g_t).all() and torch.isfinite(g_s).all()
    # the finite row's value and gradient do not see the infinite row
    ref = ref_pairwise_dkl(t[1], s[1], *w)
    assert val[1].item() == pytest.approx(ref.item(), rel=1e-12, abs=1e-14)


def test_floor_teacher_with_minus_inf_student_and_empty_teacher_rows():
    # teacher at LOG_FLOOR (p = 0 exactly) where the student is -inf: the wMSE ignores the column
    t = torch.tensor([[LOG_FLOOR, math.log(0.5), math.log(0.5)]], dtype=torch.float64)
    s = torch.tensor([[NEG_INF, math.log(0.25), math.log(0.75)]], dtype=torch.float64, requires_grad=True)
    val = dkl(t, s, dkl_weights=(1.0, 0.0))
    assert math.isfinite(val.item())
    assert val.item() == pytest.approx(ref_pairwise_dkl(t[0], s[0], 1.0, 0.0).item(), rel=1e-12)
    (g,) = torch.autograd.grad(val.sum(), s)
    assert torch.isfinite(g).all()
    # a teacher row with no mass at all (every column at the floor): 0, connected, no NaN
    t0 = torch.full((1, 4), LOG_FLOOR, dtype=torch.float64)
    s0 = torch.log_softmax(torch.randn(1, 4, dtype=torch.float64), -1).requires_grad_()
    val0 = dkl(t0, s0, dkl_weights=(1.0, 1.0))
    assert val0.item() == 0.0
    (g0,) = torch.autograd.grad(val0.sum(), s0)
    assert torch.isfinite(g0).all()


def test_nan_input_gives_nan():
    t = torch.log_softmax(torch.randn(2, 5, dtype=torch.float64), -1)
    s = torch.log_softmax(torch.randn(2, 5, dtype=torch.float64), -1)
    s[0, 2] = float("nan")
    val = dkl(t, s, dkl_weights=(1.0, 1.0))
    assert math.isnan(val[0].item()) and math.isfinite(val[1].item())


# ---------------------------------------------------------------- knobs
@pytest.mark.parametrize(
    "bad, shown",
    [
        ((float("nan"), 1.0), "nan"),
        ((1.0, float("inf")), "inf"),
        ((-0.5, 1.0), "-0.5"),
        ((0.0, 0.0), r"\(0.0, 0.0\)"),
        ((0, 0), r"\(0, 0\)"),
        ((True, 1.0), "True"),
        (("1", 1.0), "'1'"),
        ((1.0,), r"\(1.0,\)"),
        ((1.0, 1.0, 1.0), r"\(1.0, 1.0, 1.0\)"),
        (0.5, "0.5"),
        (None, "None"),
    ],
)
def test_bad_weights_raise_naming_the_value(bad, shown):
    t = torch.log_softmax(torch.randn(2, 5, dtype=torch.float64), -1)
    with pytest.raises(ValueError, match=f"dkl_weights.*{shown}"):
        dkl(t, t, dkl_weights=bad)
    with pytest.raises(ValueError, match=f"dkl_weights.*{shown}"):
        divergence(t, t, kind="dkl", dkl_weights=bad)
    with pytest.raises(ValueError, match=f"dkl_weights.*{shown}"):
        divergence(t, t, kind="fkl", dkl_weights=bad)  # validated whatever the kind
    with pytest.raises(ValueError, match=f"dkl_weights.*{shown}"):
        token_kd_loss(t, t, divergence_name="dkl", dkl_weights=bad)


def test_good_weights_are_normalised_to_floats():
    assert check_dkl_weights((1, 0)) == (1.0, 0.0)
    assert check_dkl_weights([0.25, 2]) == (0.25, 2.0)


def test_token_kd_loss_passes_the_weights():
    torch.manual_seed(18)
    s, t = torch.randn(2, 3, 11, dtype=torch.float64), torch.randn(2, 3, 11, dtype=torch.float64)
    base = token_kd_loss(s, t, divergence_name="fkl", temperature=2.0)
    assert token_kd_loss(s, t, divergence_name="dkl", temperature=2.0).item() == pytest.approx(base.item(), rel=1e-12)
    more = token_kd_loss(s, t, divergence_name="dkl", temperature=2.0, dkl_weights=(1.0, 1.0))
    assert more.item() > base.item()


# ---------------------------------------------------------------- memory: O(V) per row
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_vocabulary_never_forms_v_by_v(dtype):
    # a (2, V, V) tensor at V = 150k would be 180 GB (fp32): merely running proves the O(V) form
    v = 150_000
    g = torch.Generator().manual_seed(19)
    t = torch.log_softmax(torch.randn(2, v, generator=g, dtype=torch.float64) * 3, -1)
    s_logits = (torch.randn(2, v, generator=g, dtype=torch.float64) * 3).to(dtype).requires_grad_()
    val = dkl(t.to(dtype), torch.log_softmax(s_logits, -1), dkl_weights=(1.0, 1.0))
    assert val.shape == (2,) and val.dtype == dtype and torch.isfinite(val).all()
    (g_s,) = torch.autograd.grad(val.sum(), s_logits)
    assert g_s.shape == (2, v) and torch.isfinite(g_s).all()
    # agrees with the closed form KL + 1/2 Var_p(t - s), in float64
    s64 = torch.log_softmax(s_logits.detach().double(), -1)
    p, e = t.exp(), t - s64
    want = (p * e).sum(-1) + 0.5 * ((p * e**2).sum(-1) - (p * e).sum(-1) ** 2)
    torch.testing.assert_close(val.double(), want, rtol=1e-4 if dtype == torch.float32 else 1e-10, atol=1e-6)
