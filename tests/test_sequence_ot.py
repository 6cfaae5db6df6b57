"""Sequence-level transport (MultiLevelOT's optional term): values against a per-sequence POT reference, gradients
against finite differences, identical sides, masks and padding, cached teachers, bf16, and input validation."""

from __future__ import annotations

import itertools
import math

import numpy as np
import ot
import pytest
import torch

from xtok_kd.losses import sequence_ot
from xtok_kd.losses.sequence_ot import SequenceOT, sequence_transport
from xtok_kd.losses.types import TeacherTopK

F64 = torch.float64
TIGHT = {"max_iter": 20000, "tol": 1e-12}


def _logits(batch: int, length: int, vocab: int, *, seed: int, dtype: torch.dtype = F64) -> torch.Tensor:
    """Peaked random logits: per-position scale in [1, 4]."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(batch, length, 1, generator=g, dtype=F64) * 3 + 1
    return (torch.randn(batch, length, vocab, generator=g, dtype=F64) * scale).to(dtype)


def _mask(batch: int, length: int, *, seed: int, keep: float = 0.7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, length, generator=g) < keep


def _sorted_vectors(probs: np.ndarray, k: int) -> np.ndarray:
    """``(n, V)`` probabilities -> ``(n, k)`` descending, zero-padded to ``k``."""
    head = -np.sort(-probs, axis=1)[:, :k]
    return np.pad(head, ((0, 0), (0, k - head.shape[1])))


def _reference(t_probs: np.ndarray, s_probs: np.ndarray, k: int, epsilon: float) -> float:
    """Slow reference for one sequence: POT's plan on uniform marginals, ``<T, M> + eps KL(T || a b^T)``."""
    x, y = _sorted_vectors(t_probs, k), _sorted_vectors(s_probs, k)
    cost = np.abs(x[:, None, :] - y[None, :, :]).sum(-1)
    a = np.full(len(x), 1 / len(x))
    b = np.full(len(y), 1 / len(y))
    plan = ot.sinkhorn(a, b, cost, epsilon, method="sinkhorn_log", numItermax=100000, stopThr=1e-14)
    ref = a[:, None] * b[None, :]
    kl = np.where(plan > 0, plan * np.log(np.where(plan > 0, plan, 1) / ref), 0).sum()
    return float((plan * cost).sum() + epsilon * kl)


def _reference_batch(student, teacher, s_mask, t_mask, *, k, epsilon, temperature=1.0):
    out = []
    for b in range(student.shape[0]):
        if not s_mask[b].any() or not t_mask[b].any():
            out.append(0.0)
            continue
        t = torch.softmax(teacher[b][t_mask[b]].double() / temperature, -1).numpy()
        s = torch.softmax(student[b][s_mask[b]].double() / temperature, -1).numpy()
        out.append(_reference(t, s, k, epsilon))
    return torch.tensor(out, dtype=F64)


# ------------------------------------------------------------------------------------------------ values vs POT


@pytest.mark.parametrize(("vs", "vt", "k", "temperature", "epsilon"), [
    (9, 13, 4, 1.0, 0.1),    # k below both vocabularies
    (5, 11, 8, 2.0, 0.05),   # k above the student's vocabulary: its vectors are zero-padded
    (7, 7, 3, 0.7, 0.3),
])
def test_value_matches_per_sequence_pot_reference(vs, vt, k, temperature, epsilon):
    student = _logits(3, 6, vs, seed=vs)
    teacher = _logits(3, 8, vt, seed=vt + 50)
    s_mask, t_mask = _mask(3, 6, seed=1), _mask(3, 8, seed=2)
    s_mask[1, :2] = True  # ensure every sequence has positions on both sides
    t_mask[1, :3] = True
    result = sequence_transport(student, teacher, s_mask, t_mask, top_k=k, temperature=temperature,
                                epsilon=epsilon, **TIGHT)
    assert isinstance(result, SequenceOT)
    assert result.value.dtype == F64 and result.converged.all()
    want = _reference_batch(student, teacher, s_mask, t_mask, k=k, epsilon=epsilon, temperature=temperature)
    torch.testing.assert_close(result.value, want, rtol=1e-8, atol=1e-10)
    assert result.teacher_positions.tolist() == t_mask.sum(1).tolist()
    assert result.student_positions.tolist() == s_mask.sum(1).tolist()


def test_fp32_default_knobs_track_the_reference():
    student = _logits(2, 12, 40, seed=3, dtype=torch.float32)
    teacher = _logits(2, 10, 50, seed=4, dtype=torch.float32)
    s_mask, t_mask = torch.ones(2, 12, dtype=torch.bool), torch.ones(2, 10, dtype=torch.bool)
    result = sequence_transport(student, teacher, s_mask, t_mask, top_k=16)
    assert result.value.dtype == torch.float32 and result.converged.all()
    want = _reference_batch(student, teacher, s_mask, t_mask, k=16, epsilon=0.1)
    torch.testing.assert_close(result.value.double(), want, rtol=1e-3, atol=1e-4)


# ------------------------------------------------------------------------------------------------ gradients


@pytest.mark.parametrize(("temperature", "unbiased"), [(1.0, False), (1.7, False), (1.0, True)])
def test_gradients_match_finite_differences(temperature, unbiased):
    student = _logits(2, 4, 6, seed=11).requires_grad_()
    teacher = _logits(2, 5, 7, seed=12)
    s_mask = torch.tensor([[True, False, True, True], [True, True, False, True]])
    t_mask = torch.tensor([[True, True, False, True, True], [False, True, True, True, False]])

    def fn(z):
        return sequence_transport(z, teacher, s_mask, t_mask, top_k=4, temperature=temperature, epsilon=0.3,
                                  unbiased=unbiased, **TIGHT).value

    assert torch.autograd.gradcheck(fn, (student,), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_l1_cost_backward_in_rank_groups_equals_cdist_autograd(monkeypatch):
    monkeypatch.setattr(sequence_ot, "_COST_GRAD_ELEMENTS", 2 * 3 * 5 * 2)  # groups of 2 ranks out of 7
    g = torch.Generator().manual_seed(5)
    x = torch.rand(2, 3, 7, generator=g, dtype=F64, requires_grad=True)
    y = torch.rand(2, 5, 7, generator=g, dtype=F64, requires_grad=True)
    weight = torch.rand(2, 3, 5, generator=g, dtype=F64)
    got = torch.autograd.grad((sequence_ot._l1_cost(x, y) * weight).sum(), (x, y))
    want = torch.autograd.grad((torch.cdist(x, y, p=1) * weight).sum(), (x, y))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------------ identical sides


def test_identical_sides_plan_concentrates_as_epsilon_shrinks_and_unbiased_is_zero():
    logits = _logits(2, 7, 30, seed=21)
    mask = _mask(2, 7, seed=22, keep=0.8)
    costs = []
    for epsilon in (0.2, 0.05, 0.01, 0.002):
        result = sequence_transport(logits, logits, mask, mask, top_k=8, epsilon=epsilon, **TIGHT)
        assert result.converged.all()
        costs.append(result.transport_cost)
    for big, small in itertools.pairwise(costs):
        assert (small <= big + 1e-12).all()
    assert (costs[-1] < 1e-6).all()  # the plan is (numerically) diagonal: every position matched with itself
    unbiased = sequence_transport(logits, logits, mask, mask, top_k=8, epsilon=0.1, unbiased=True, **TIGHT)
    assert unbiased.value.abs().max() < 1e-12


def test_unbiased_is_positive_for_different_sides():
    student, teacher = _logits(3, 5, 12, seed=31), _logits(3, 6, 12, seed=32)
    s_mask, t_mask = torch.ones(3, 5, dtype=torch.bool), torch.ones(3, 6, dtype=torch.bool)
    result = sequence_transport(student, teacher, s_mask, t_mask, top_k=6, unbiased=True, **TIGHT)
    assert (result.value > 0).all() and result.converged.all()


# ------------------------------------------------------------------------------------------------ masks and padding


def test_masked_positions_change_nothing_and_get_no_gradient():
    student = _logits(2, 6, 9, seed=41).requires_grad_()
    teacher = _logits(2, 7, 10, seed=42)
    s_mask, t_mask = _mask(2, 6, seed=43), _mask(2, 7, seed=44)
    s_mask[:, 0] = t_mask[:, 0] = True
    s_mask[:, 1] = t_mask[:, 1] = False
    base = sequence_transport(student, teacher, s_mask, t_mask, top_k=5, **TIGHT)
    (grad,) = torch.autograd.grad(base.value.sum(), student)
    assert grad[~s_mask].abs().max() == 0 and grad[s_mask].abs().max() > 0

    junk_s = student.detach().clone()
    junk_s[~s_mask] = math.nan  # never read
    junk_t = teacher.clone()
    junk_t[~t_mask] = math.inf
    junk_s.requires_grad_()
    other = sequence_transport(junk_s, junk_t, s_mask, t_mask, top_k=5, **TIGHT)
    (grad2,) = torch.autograd.grad(other.value.sum(), junk_s)
    torch.testing.assert_close(other.value, base.value, rtol=0, atol=0)
    torch.testing.assert_close(grad2, grad, rtol=0, atol=0)


def test_batched_padding_equals_each_sequence_alone():
    student = _logits(3, 8, 9, seed=51)
    teacher = _logits(3, 6, 11, seed=52)
    s_mask = torch.zeros(3, 8, dtype=torch.bool)
    t_mask = torch.zeros(3, 6, dtype=torch.bool)
    s_mask[0, [0, 3, 7]] = True
    s_mask[1, :8] = True
    s_mask[2, [5]] = True
    t_mask[0, :6] = True
    t_mask[1, [1, 2]] = True
    t_mask[2, [0, 4, 5]] = True
    batched = sequence_transport(student, teacher, s_mask, t_mask, top_k=5, **TIGHT)
    for b in range(3):
        s = student[b][s_mask[b]][None]
        t = teacher[b][t_mask[b]][None]
        alone = sequence_transport(s, t, torch.ones(s.shape[:2], dtype=torch.bool),
                                   torch.ones(t.shape[:2], dtype=torch.bool), top_k=5, **TIGHT)
        torch.testing.assert_close(batched.value[b], alone.value[0], rtol=1e-10, atol=1e-12)


def test_empty_side_gives_zero_converged_and_a_usable_graph():
    student = _logits(3, 4, 6, seed=61).requires_grad_()
    teacher = _logits(3, 5, 6, seed=62)
    s_mask = torch.tensor([[True, True, False, False], [False] * 4, [True] * 4])
    t_mask = torch.tensor([[False] * 5, [True] * 5, [True, False, True, False, True]])
    result = sequence_transport(student, teacher, s_mask, t_mask, top_k=3, **TIGHT)
    assert result.value[:2].tolist() == [0.0, 0.0] and result.value[2] > 0
    assert result.converged.all() and result.iterations[:2].tolist() == [0, 0]
    (grad,) = torch.autograd.grad(result.value.sum(), student)
    assert grad[:2].abs().max() == 0 and grad[2].abs().max() > 0

    nothing = sequence_transport(student, teacher, torch.zeros_like(s_mask), t_mask, top_k=3)
    assert nothing.value.tolist() == [0.0, 0.0, 0.0] and nothing.converged.all()
    (grad,) = torch.autograd.grad(nothing.value.sum(), student)
    assert grad.abs().max() == 0


# ------------------------------------------------------------------------------------------------ cached teacher


def _cached(teacher: torch.Tensor, slots: int, *, empty: int = 0, seed: int = 0) -> TeacherTopK:
    """Top-``slots`` of the teacher's log-softmax in shuffled slot order, plus ``empty`` empty slots."""
    logp = torch.log_softmax(teacher, -1)
    vals, ids = torch.topk(logp, slots, dim=-1)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(slots, generator=g)
    vals, ids = vals[..., perm], ids[..., perm]
    if empty:
        ids = torch.cat([ids, ids.new_full((*ids.shape[:2], empty), -1)], -1)
        vals = torch.cat([vals, vals.new_full((*vals.shape[:2], empty), 0.0)], -1)  # ignored: the id is -1
    return TeacherTopK(ids, vals)


@pytest.mark.parametrize(("slots", "empty"), [(5, 0), (8, 2)])
def test_cached_topk_equals_full_logits_when_it_holds_k_slots(slots, empty):
    student, teacher = _logits(2, 5, 9, seed=71), _logits(2, 6, 12, seed=72)
    s_mask, t_mask = _mask(2, 5, seed=73, keep=0.9), _mask(2, 6, seed=74, keep=0.9)
    s_mask[:, 0] = t_mask[:, 0] = True
    full = sequence_transport(student, teacher, s_mask, t_mask, top_k=5, **TIGHT)
    cached = _cached(teacher, slots, empty=empty, seed=slots)
    from_cache = sequence_transport(student, cached, s_mask, t_mask, top_k=5, **TIGHT)
    torch.testing.assert_close(from_cache.value, full.value, rtol=1e-10, atol=1e-12)
    pair = sequence_transport(student, (cached.ids, cached.logprobs), s_mask, t_mask, top_k=5, **TIGHT)
    torch.testing.assert_close(pair.value, from_cache.value, rtol=1e-10, atol=1e-12)


def test_cached_topk_with_fewer_slots_is_zero_padded():
    student, teacher = _logits(1, 4, 9, seed=81), _logits(1, 5, 12, seed=82)
    mask_s, mask_t = torch.ones(1, 4, dtype=torch.bool), torch.ones(1, 5, dtype=torch.bool)
    got = sequence_transport(student, _cached(teacher, 3), mask_s, mask_t, top_k=6, epsilon=0.1, **TIGHT)
    t_probs = torch.softmax(teacher[0], -1).numpy()
    head = -np.sort(-t_probs, axis=1)[:, :3]  # what the cache holds; the rest is unknown, so zero
    t_vectors = np.pad(head, ((0, 0), (0, 9)))
    want = _reference(t_vectors, torch.softmax(student[0], -1).numpy(), 6, 0.1)
    assert abs(float(got.value[0]) - want) < 1e-9


# ------------------------------------------------------------------------------------------------ dtypes


def test_bf16_input_is_solved_in_fp32_and_backpropagates():
    student = _logits(2, 6, 20, seed=91, dtype=torch.bfloat16).requires_grad_()
    teacher = _logits(2, 5, 24, seed=92, dtype=torch.bfloat16)
    s_mask, t_mask = torch.ones(2, 6, dtype=torch.bool), torch.ones(2, 5, dtype=torch.bool)
    result = sequence_transport(student, teacher, s_mask, t_mask, top_k=8)
    assert result.value.dtype == torch.float32 and result.converged.all()
    upcast = sequence_transport(student.detach().float(), teacher.float(), s_mask, t_mask, top_k=8)
    torch.testing.assert_close(result.value, upcast.value, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(result.value.sum(), student)
    assert grad.dtype == torch.bfloat16 and torch.isfinite(grad).all() and grad.abs().max() > 0


# ------------------------------------------------------------------------------------------------ validation


def _valid():
    student, teacher = _logits(2, 3, 5, seed=1), _logits(2, 4, 6, seed=2)
    return student, teacher, torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 4, dtype=torch.bool)


@pytest.mark.parametrize(("change", "match"), [
    ({"top_k": 0}, "top_k must be an int >= 1.*got 0"),
    ({"top_k": True}, "top_k.*got True"),
    ({"top_k": 2.0}, "top_k.*got 2.0"),
    ({"epsilon": 0.0}, "epsilon must be a finite number > 0.*got 0.0"),
    ({"epsilon": math.nan}, "epsilon.*got nan"),
    ({"temperature": -1.0}, "temperature must be a finite number > 0, got -1.0"),
    ({"max_iter": 0}, "max_iter must be an int >= 1, got 0"),
    ({"tol": -1e-3}, "tol must be a finite number > 0.*got -0.001"),
])
def test_bad_options_raise_naming_the_value(change, match):
    student, teacher, s_mask, t_mask = _valid()
    with pytest.raises(ValueError, match=match):
        sequence_transport(student, teacher, s_mask, t_mask, **change)


def test_bad_tensors_raise_naming_the_value():
    student, teacher, s_mask, t_mask = _valid()
    with pytest.raises(ValueError, match=r"student_logits must be a floating-point tensor \(B, L, V\).*\(2, 3\)"):
        sequence_transport(student[..., 0], teacher, s_mask, t_mask)
    with pytest.raises(ValueError, match="student_logits.*torch.int64"):
        sequence_transport(student.long(), teacher, s_mask, t_mask)
    with pytest.raises(ValueError, match="teacher has batch size 1 but student_logits has 2"):
        sequence_transport(student, teacher[:1], s_mask, t_mask)
    with pytest.raises(ValueError, match=r"student_mask has shape \(2, 4\) but student_logits needs \(2, 3\)"):
        sequence_transport(student, teacher, t_mask, t_mask)
    with pytest.raises(ValueError, match=r"teacher_mask has shape \(2, 3\) but the teacher needs \(2, 4\)"):
        sequence_transport(student, teacher, s_mask, s_mask)
    with pytest.raises(ValueError, match="teacher_mask must be a bool tensor.*torch.int64"):
        sequence_transport(student, teacher, s_mask, t_mask.long())
    with pytest.raises(ValueError, match="teacher must be logits.*got str"):
        sequence_transport(student, "teacher", s_mask, t_mask)
    cached = _cached(teacher, 3)
    with pytest.raises(ValueError, match="temperature-1 log-probabilities.*temperature=2.0"):
        sequence_transport(student, cached, s_mask, t_mask, temperature=2.0)
    with pytest.raises(ValueError, match="top-k ids must be an integer tensor.*torch.float32"):
        sequence_transport(student, (cached.ids.float(), cached.logprobs), s_mask, t_mask)
    with pytest.raises(ValueError, match=r"logprobs must be a floating-point tensor of the ids' shape \(2, 4, 3\)"):
        sequence_transport(student, (cached.ids, cached.logprobs[..., :2]), s_mask, t_mask)
    raw = cached.logprobs.clone()
    raw[1, 2, 0] = 3.5
    with pytest.raises(ValueError, match="logprobs hold 3.5 at batch 1, position 2, slot 0"):
        sequence_transport(student, (cached.ids, raw), s_mask, t_mask)
    over = torch.full_like(cached.logprobs, math.log(0.5))
    with pytest.raises(ValueError, match="batch 0, position 0 sum to 1.5 > 1"):
        sequence_transport(student, (cached.ids, over), s_mask, t_mask)
    bad = student.clone()
    bad[1, 2, 3] = math.nan
    with pytest.raises(ValueError, match="student_logits at batch 1, position 2 give non-finite probabilities"):
        sequence_transport(bad, teacher, s_mask, t_mask)
    with pytest.raises(ValueError, match="teacher logits at batch 0, position 1 give non-finite"):
        tb = teacher.clone()
        tb[0, 1, 0] = math.inf
        sequence_transport(student, tb, s_mask, t_mask)
