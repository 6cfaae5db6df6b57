"""Entropic OT core of ``mapping="sinkhorn"``: values against POT's single-problem solvers, envelope gradients
against finite differences, the debiased divergence, the cost builders against hand-built tables and slow loops."""

from __future__ import annotations

import math

import ot
import pytest
import torch

from xtok_kd.losses.transport import (
    embedding_cost,
    embedding_self_cost,
    entropic_ot,
    lexical_cost,
    self_cost,
    sinkhorn_divergence,
)

F64 = torch.float64
TIGHT = {"max_iter": 20000, "tol": 1e-11}


def _histograms(rows: int, n: int, *, zeros: int = 0, seed: int = 0) -> torch.Tensor:
    """``(rows, n)`` fp64 rows summing to 1, peaked, with ``zeros`` zero-mass atoms per row at random places."""
    g = torch.Generator().manual_seed(seed)
    p = (torch.randn(rows, n, generator=g, dtype=F64) * 2).softmax(-1)
    if zeros:
        idx = torch.rand(rows, n, generator=g).argsort(1)[:, :zeros]
        p = p.scatter(1, idx, 0.0)
    return p / p.sum(1, keepdim=True)


def _problems(rows: int, n: int, m: int, *, zeros: int = 0, seed: int = 0):
    g = torch.Generator().manual_seed(seed + 100)
    cost = torch.rand(rows, n, m, generator=g, dtype=F64)
    return _histograms(rows, n, zeros=zeros, seed=seed), _histograms(rows, m, zeros=zeros, seed=seed + 1), cost


def _kl(plan: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``KL(plan || a b^T)`` with ``0 log 0 = 0``."""
    ref = a[:, None] * b[None, :]
    return torch.where(plan > 0, plan * torch.log(plan / torch.where(ref > 0, ref, 1.0)), 0.0).sum()


# ------------------------------------------------------------------------------------------------ values vs POT


@pytest.mark.parametrize(("n", "m", "zeros", "epsilon"), [(7, 7, 0, 0.1), (9, 4, 2, 0.1), (3, 11, 1, 0.05),
                                                          (17, 17, 3, 0.2)])
def test_values_match_pot_single_problem_solver_row_by_row(n, m, zeros, epsilon):
    a, b, cost = _problems(6, n, m, zeros=zeros, seed=n * m)
    result = entropic_ot(a, b, cost, epsilon=epsilon, **TIGHT)
    assert result.converged.all()
    for i in range(a.shape[0]):
        want = ot.sinkhorn2(a[i], b[i], cost[i], epsilon, method="sinkhorn_log", numItermax=100000, stopThr=1e-13)
        plan = ot.sinkhorn(a[i], b[i], cost[i], epsilon, method="sinkhorn_log", numItermax=100000, stopThr=1e-13)
        assert abs(float(result.transport_cost[i]) - float(want)) < 1e-5
        objective = float(want) + epsilon * float(_kl(plan, a[i], b[i]))
        assert abs(float(result.value[i]) - objective) < 1e-5


def test_batched_rounds_give_each_row_its_own_solution():
    """Rows that converge at different iterations leave the batch at different rounds; the answers do not move."""
    a, b, cost = _problems(8, 6, 5, zeros=1, seed=3)
    cost[::2] *= 8  # half the rows are much harder (epsilon small relative to their costs)
    batch = entropic_ot(a, b, cost, epsilon=0.1, **TIGHT)
    assert batch.iterations.unique().numel() > 1
    for i in range(8):
        one = entropic_ot(a[i:i + 1], b[i:i + 1], cost[i:i + 1], epsilon=0.1, **TIGHT)
        torch.testing.assert_close(batch.value[i:i + 1], one.value, rtol=0, atol=1e-9)
        assert batch.iterations[i] == one.iterations[0]


def test_transport_cost_approaches_emd_as_epsilon_shrinks():
    a, b, cost = _problems(4, 6, 5, zeros=1, seed=11)
    exact = torch.tensor([float(ot.emd2(a[i], b[i], cost[i])) for i in range(4)], dtype=F64)
    gaps = []
    for epsilon in (0.1, 0.03, 0.01):
        result = entropic_ot(a, b, cost, epsilon=epsilon, max_iter=50000, tol=1e-10)
        assert result.converged.all()
        gaps.append((result.transport_cost - exact).abs().max().item())
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[2] < 0.02


# ------------------------------------------------------------------------------------------------ gradients


def test_gradients_through_softmax_and_cost_match_finite_differences():
    g = torch.Generator().manual_seed(5)
    teacher_logits = torch.randn(3, 6, generator=g, dtype=F64, requires_grad=True)
    student_logits = torch.randn(3, 4, generator=g, dtype=F64, requires_grad=True)
    cost = torch.rand(3, 6, 4, generator=g, dtype=F64, requires_grad=True)
    weights = torch.randn(3, generator=g, dtype=F64)

    def loss(t, s, c):
        return (entropic_ot(t.softmax(-1), s.softmax(-1), c, epsilon=0.1, **TIGHT).value * weights).sum()

    assert torch.autograd.gradcheck(loss, (teacher_logits, student_logits, cost), eps=1e-6, atol=1e-6)


def test_potentials_are_centred_and_a_zero_mass_atom_gets_the_one_sided_derivative():
    a = torch.tensor([[0.5, 0.5, 0.0]], dtype=F64, requires_grad=True)
    b = torch.tensor([[0.3, 0.7]], dtype=F64, requires_grad=True)
    cost = torch.tensor([[[0.2, 0.9], [0.7, 0.1], [0.4, 0.5]]], dtype=F64)
    value = entropic_ot(a, b, cost, **TIGHT).value
    value.sum().backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    assert abs(a.grad.sum().item()) < 1e-12 and abs(b.grad.sum().item()) < 1e-12
    direction = torch.tensor([[-0.5, -0.5, 1.0]], dtype=F64)  # move mass onto the empty atom
    h = 1e-7
    moved = entropic_ot(a.detach() + h * direction, b.detach(), cost, **TIGHT).value
    assert abs((moved - value.detach()).item() / h - (a.grad * direction).sum().item()) < 1e-5


def test_no_graph_over_iterations_and_low_precision_inputs_solve_in_fp32():
    a, b, cost = _problems(4, 5, 5, seed=2)
    a16 = a.to(torch.bfloat16).requires_grad_()
    result = entropic_ot(a16, b.float(), cost.float())
    assert result.value.dtype == torch.float32 and result.value.grad_fn is not None
    result.value.sum().backward()
    assert a16.grad is not None and a16.grad.dtype == torch.bfloat16 and torch.isfinite(a16.grad.float()).all()


# ------------------------------------------------------------------------------------------------ divergence


def test_divergence_is_zero_for_identical_inputs_and_positive_otherwise():
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(0, 50, (5, 8), generator=g)
    a = _histograms(5, 9, seed=1)
    cost = self_cost(ids, dtype=F64)
    same = sinkhorn_divergence(a, a, cost, cost, cost)
    assert same.converged.all() and same.value.abs().max() < 1e-6
    b = _histograms(5, 9, seed=2)
    other = sinkhorn_divergence(a, b, cost, cost, cost, **TIGHT)
    assert other.converged.all() and (other.value > 1e-4).all()


def test_self_problems_take_the_symmetric_path_and_match_pot():
    """``OT(a, a)`` with a near-diagonal symmetric cost: plain Sinkhorn crawls, the averaged update does not."""
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(0, 50, (3, 8), generator=g)
    a = _histograms(3, 9, zeros=1, seed=1)
    cost = self_cost(ids, dtype=F64)
    result = entropic_ot(a, a, cost, **TIGHT)
    assert result.converged.all() and (result.iterations <= 30).all()
    for i in range(3):
        want = ot.sinkhorn2(a[i], a[i], cost[i], 0.1, method="sinkhorn_log", numItermax=200000, stopThr=1e-9)
        assert abs(float(result.transport_cost[i]) - float(want)) < 1e-5
    asymmetric = cost + 1e-12 * torch.rand(3, 9, 9, generator=g, dtype=F64).tril(-1)  # takes POT's path
    plain = entropic_ot(a, a, asymmetric, max_iter=300, tol=1e-6)
    assert not plain.converged.all() and (plain.iterations > result.iterations).all()


# ------------------------------------------------------------------------------------------------ cost builders

# Tiny vocabularies (6 teacher, 6 student tokens) with one entry per rule.
LENGTHS_T = torch.tensor([1, 4, 1, 3, 2, 5])
LENGTHS_S = torch.tensor([1, 2, 4, 3, 2, 6])


def _tiny_tables() -> dict[str, torch.Tensor]:
    return {
        "exact_t2s": torch.tensor([0, -1, -1, -1, -1, -1]),  # t0 == s0
        "t2s_first": torch.tensor([0, 1, -1, -1, -1, -1]),  # t1 starts with s1: 2 / 4 bytes
        "s2t_first": torch.tensor([-1, -1, 2, -1, -1, -1]),  # s2 starts with t2: 1 / 4 bytes
        "t2s_neighbours": torch.tensor([[-1, -1], [1, -1], [2, -1], [3, -1], [-1, -1], [-1, -1]]),
        "t2s_neighbour_scores": torch.tensor([[0, 0], [0.7, 0], [0.1, 0], [0.6, 0], [0, 0], [0, 0]]),
        "s2t_neighbours": torch.tensor([[-1, -1], [-1, -1], [-1, -1], [-1, -1], [4, 3], [-1, -1]]),
        "s2t_neighbour_scores": torch.tensor([[0, 0], [0, 0], [0, 0], [0, 0], [0.3, 0.9], [0, 0]]),
        "teacher_lengths": LENGTHS_T,
        "student_lengths": LENGTHS_S,
    }


def _expected(teacher: list[int], student: list[int], pairs: dict[tuple[int, int], float]) -> torch.Tensor:
    out = torch.ones(len(teacher) + 1, len(student) + 1)
    for i, t in enumerate(teacher):
        for j, s in enumerate(student):
            if t >= 0 and s >= 0 and (t, s) in pairs:
                out[i, j] = pairs[(t, s)]
    out[-1, -1] = 0
    return out


def test_lexical_cost_covers_every_rule():
    pairs = {
        (0, 0): 0.0,  # exact
        (1, 1): 0.3,  # first piece gives 1 - 2/4 = 0.5, the t2s neighbour 1 - 0.7 = 0.3: the smaller wins
        (2, 2): 0.75,  # s2t first piece 1 - 1/4 beats the weak t2s neighbour (1 - 0.1)
        (3, 3): 0.4,  # t2s neighbour
        (4, 4): 0.7,  # s2t neighbour
        (3, 4): 0.1,  # s2t neighbour, second column
    }
    teacher = [[0, 1, 2, 3, 4, -1], [4, 3, -1, 2, 1, 0]]
    student = [[0, 1, 2, 3, 4, 5, -1], [-1, 5, 4, 3, 2, 1, 0]]
    cost = lexical_cost(torch.tensor(teacher), torch.tensor(student), **_tiny_tables())
    assert cost.shape == (2, 7, 8) and cost.dtype == torch.float32
    for row in range(2):
        torch.testing.assert_close(cost[row], _expected(teacher[row], student[row], pairs), rtol=0, atol=1e-6)


def test_lexical_cost_exact_only_and_empty_slots():
    exact = torch.tensor([2, -1, 0])
    cost = lexical_cost(torch.tensor([[0, 1, -1]]), torch.tensor([[2, -1, 0]]), exact_t2s=exact, dtype=F64)
    want = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]], dtype=F64)
    torch.testing.assert_close(cost[0], want, rtol=0, atol=0)


def test_lexical_cost_of_the_identity_table_is_self_cost():
    vocab = 40
    identity = torch.arange(vocab)
    g = torch.Generator().manual_seed(4)
    ids = torch.stack([torch.randperm(vocab, generator=g)[:7] for _ in range(5)])
    ids[1, 3] = -1
    tables = {"exact_t2s": identity, "t2s_first": identity, "s2t_first": identity,
              "teacher_lengths": torch.randint(1, 6, (vocab,), generator=g)}
    tables["student_lengths"] = tables["teacher_lengths"]
    torch.testing.assert_close(lexical_cost(ids, ids, **tables), self_cost(ids), rtol=0, atol=0)


def test_lexical_cost_errors_name_the_bad_input():
    with pytest.raises(ValueError, match=r"teacher_lengths and student_lengths"):
        lexical_cost(torch.tensor([[0]]), torch.tensor([[0]]), exact_t2s=torch.tensor([0]),
                     t2s_first=torch.tensor([0]))
    with pytest.raises(ValueError, match=r"t2s_neighbour_scores go together"):
        lexical_cost(torch.tensor([[0]]), torch.tensor([[0]]), exact_t2s=torch.tensor([0]),
                     t2s_neighbours=torch.tensor([[0]]))
    with pytest.raises(ValueError, match=r"teacher_ids must be an integer tensor.*torch.float32"):
        lexical_cost(torch.tensor([[0.0]]), torch.tensor([[0]]), exact_t2s=torch.tensor([0]))


def test_embedding_cost_matches_a_slow_loop():
    g = torch.Generator().manual_seed(6)
    embeddings = torch.randn(10, 5, generator=g).to(torch.bfloat16)
    embeddings[7] = 0
    teacher = torch.tensor([[1, 7, 3, -1], [0, 2, 9, 4]])
    student = torch.tensor([[3, -1, 7], [9, 9, 5]])
    cost = embedding_cost(teacher, student, embeddings)
    e = embeddings.to(F64)
    for r in range(2):
        want = torch.ones(5, 4, dtype=F64)
        want[-1, -1] = 0
        for i, t in enumerate(teacher[r].tolist()):
            for j, s in enumerate(student[r].tolist()):
                if t >= 0 and s >= 0:
                    norm = e[t].norm() * e[s].norm()
                    want[i, j] = 1 - (float(e[t] @ e[s] / norm) if norm > 0 else 0.0)
        torch.testing.assert_close(cost[r].double(), want, rtol=0, atol=1e-5)
    self_t = embedding_self_cost(student, embeddings)
    assert self_t.shape == (2, 4, 4) and (self_t.diagonal(dim1=1, dim2=2) == 0).all()
    assert (self_t[0, 1, 0] == 1) and abs(self_t[1, 0, 1].item()) < 1e-6  # unmapped off-diagonal; repeated id


# ------------------------------------------------------------------------------------------------ reporting, errors


def test_unconverged_rows_are_reported():
    a, b, cost = _problems(4, 6, 6, seed=8)
    result = entropic_ot(a, b, cost * 5, epsilon=0.05, max_iter=1)
    assert not result.converged.any() and (result.iterations == 1).all()
    assert (result.marginal_error > 1e-4).all() and torch.isfinite(result.value).all()
    done = entropic_ot(a, b, cost, **TIGHT)
    assert done.converged.all() and (done.marginal_error <= 1e-11).all()


def test_empty_batch():
    result = entropic_ot(torch.zeros(0, 3), torch.zeros(0, 2), torch.zeros(0, 3, 2))
    assert result.value.shape == (0,) and result.converged.shape == (0,)


@pytest.mark.parametrize("epsilon", [0.0, -0.1, math.nan, math.inf])
def test_bad_epsilon_is_named(epsilon):
    a, b, cost = _problems(1, 3, 3)
    with pytest.raises(ValueError, match=rf"epsilon must be a finite number > 0.*got {epsilon!r}"):
        entropic_ot(a, b, cost, epsilon=epsilon)


@pytest.mark.parametrize(("knob", "value"), [("max_iter", 0), ("max_iter", 2.5), ("tol", 0.0), ("tol", -1e-3)])
def test_bad_iteration_knobs_are_named(knob, value):
    a, b, cost = _problems(1, 3, 3)
    with pytest.raises(ValueError, match=rf"{knob} must be .*got {value!r}"):
        entropic_ot(a, b, cost, **{knob: value})


def test_bad_marginals_and_shapes_are_named():
    a, b, cost = _problems(2, 3, 4)
    nan_a = a.clone()
    nan_a[1, 2] = math.nan
    with pytest.raises(ValueError, match=r"a\[1, 2\] = nan.*not logits"):
        entropic_ot(nan_a, b, cost)
    negative_b = b.clone()
    negative_b[0, 1] = -0.5
    with pytest.raises(ValueError, match=r"b\[0, 1\] = -0.5"):
        entropic_ot(a, negative_b, cost)
    with pytest.raises(ValueError, match=r"b\[1\]\.sum\(\) = 2.*tail atom"):
        entropic_ot(a, b * torch.tensor([[1.0], [2.0]], dtype=F64), cost)
    with pytest.raises(ValueError, match=r"need cost \(2, 3, 4\), got cost \(2, 4, 3\)"):
        entropic_ot(a, b, cost.transpose(1, 2))
    with pytest.raises(ValueError, match=r"a \(3,\)"):
        entropic_ot(a[0], b, cost)
    bad_cost = cost.clone()
    bad_cost[1, 0, 3] = math.inf
    with pytest.raises(ValueError, match=r"cost\[1, 0, 3\] = inf"):
        entropic_ot(a, b, bad_cost)
