"""Entropic OT core of ``mapping="sinkhorn"``: values against POT's single-problem solvers, envelope gradients
against finite differences, the debiased divergence, the cost builders against hand-built tables and slow loops."""

from __future__ import annotations

import math

import ot
import pytest
import torch

from xtok_kd.losses import transport
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


@pytest.mark.parametrize("solver", ["auto", "pot"])
@pytest.mark.parametrize(("n", "m", "zeros", "epsilon"), [(7, 7, 0, 0.1), (9, 4, 2, 0.1), (3, 11, 1, 0.05),
                                                          (17, 17, 3, 0.2)])
def test_values_match_pot_single_problem_solver_row_by_row(n, m, zeros, epsilon, solver):
    a, b, cost = _problems(6, n, m, zeros=zeros, seed=n * m)
    result = entropic_ot(a, b, cost, epsilon=epsilon, solver=solver, **TIGHT)
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


@pytest.mark.parametrize("solver", ["auto", "pot"])
def test_gradients_through_softmax_and_cost_match_finite_differences(solver):
    g = torch.Generator().manual_seed(5)
    teacher_logits = torch.randn(3, 6, generator=g, dtype=F64, requires_grad=True)
    student_logits = torch.randn(3, 4, generator=g, dtype=F64, requires_grad=True)
    cost = torch.rand(3, 6, 4, generator=g, dtype=F64, requires_grad=True)
    weights = torch.randn(3, generator=g, dtype=F64)

    def loss(t, s, c):
        return (entropic_ot(t.softmax(-1), s.softmax(-1), c, epsilon=0.1, solver=solver, **TIGHT).value
                * weights).sum()

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


# ------------------------------------------------------------------------------------------------ exp-domain solver


def _lexical_like(rows: int, n: int, m: int, *, zeros: int = 0, seed: int = 0):
    """fp64 marginals and costs shaped like :func:`lexical_cost`'s: 1 except a few pairs in ``[0, 0.9]`` per atom and
    the tail-tail 0, so the exp-domain solver keeps the kernel sparse."""
    g = torch.Generator().manual_seed(seed + 200)
    cost = torch.ones(rows, n, m, dtype=F64)
    picks = torch.rand(rows, n, m, generator=g) < 1.5 / m
    cost[picks] = 0.9 * torch.rand(int(picks.sum()), generator=g, dtype=F64)
    cost[:, -1, -1] = 0
    return _histograms(rows, n, zeros=zeros, seed=seed), _histograms(rows, m, zeros=zeros, seed=seed + 1), cost


def _spy_sparse(monkeypatch) -> list[int]:
    """Count the sparse kernels the exp-domain solver builds (and let it build them for these small problems)."""
    monkeypatch.setattr(transport.common, "_SPARSE_DENSITY", 0.5)
    built = []
    original = transport.fast_solver._Kernel.from_support.__func__

    def spy(cls, *args, **kwargs):
        built.append(1)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(transport.fast_solver._Kernel, "from_support", classmethod(spy))
    return built


# (dense tail, small-kernel threshold): sparse throughout with the index_select/scatter products; sparse with the
# take/put products; sparse, then the last rows densified
SPARSE_MODES = [(0, 0), (0, 10**9), (400, 0)]


@pytest.mark.parametrize(("dense_tail", "small_nnz"), SPARSE_MODES)
def test_sparse_kernel_matches_pot_values_potentials_and_iterations(monkeypatch, dense_tail, small_nnz):
    monkeypatch.setattr(transport.common, "_DENSE_TAIL", dense_tail)
    monkeypatch.setattr(transport.common, "_SMALL_NNZ", small_nnz)
    built = _spy_sparse(monkeypatch)
    a, b, cost = _lexical_like(8, 12, 10, zeros=2, seed=1)
    cost[::3] *= 3  # rows with a wider span converge later: rows leave the batch at different rounds
    a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
    fast = entropic_ot(a1, b1, cost, solver="fast", **TIGHT)
    assert built and fast.converged.all() and fast.iterations.unique().numel() > 1
    a2, b2 = a.clone().requires_grad_(), b.clone().requires_grad_()
    pot = entropic_ot(a2, b2, cost, solver="pot", **TIGHT)
    torch.testing.assert_close(fast.value, pot.value, rtol=0, atol=1e-9)
    torch.testing.assert_close(fast.transport_cost, pot.transport_cost, rtol=0, atol=1e-9)
    weights = torch.rand(8, dtype=F64)
    fa, fb = torch.autograd.grad((fast.value * weights).sum(), (a1, b1))
    pa, pb = torch.autograd.grad((pot.value * weights).sum(), (a2, b2))
    torch.testing.assert_close(fa, pa, rtol=0, atol=1e-8)  # zero-mass atoms included (the soft c-transform)
    torch.testing.assert_close(fb, pb, rtol=0, atol=1e-8)
    for i in range(8):
        want = ot.sinkhorn2(a[i], b[i], cost[i], 0.1, method="sinkhorn_log", numItermax=100000, stopThr=1e-13)
        assert abs(float(fast.transport_cost[i]) - float(want)) < 1e-5
        one = entropic_ot(a[i:i + 1], b[i:i + 1], cost[i:i + 1], solver="fast", **TIGHT)
        torch.testing.assert_close(fast.value[i:i + 1], one.value, rtol=0, atol=1e-9)
        assert fast.iterations[i] == one.iterations[0]


def test_sparse_kernel_gradient_of_the_cost_is_the_plan(monkeypatch):
    monkeypatch.setattr(transport.common, "_DENSE_TAIL", 0)
    built = _spy_sparse(monkeypatch)
    a, b, cost = _lexical_like(3, 6, 5, zeros=1, seed=4)
    cost.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda c: entropic_ot(a, b, c, solver="fast", **TIGHT).value.sum(), (cost,),
                                    eps=1e-6, atol=1e-6)
    assert built


@pytest.mark.parametrize(("dense_tail", "small_nnz"), SPARSE_MODES)
def test_sparse_symmetric_path_matches_pot(monkeypatch, dense_tail, small_nnz):
    monkeypatch.setattr(transport.common, "_DENSE_TAIL", dense_tail)
    monkeypatch.setattr(transport.common, "_SMALL_NNZ", small_nnz)
    built = _spy_sparse(monkeypatch)
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(0, 50, (8, 8), generator=g)
    a = _histograms(8, 9, zeros=1, seed=1)
    cost = self_cost(ids, dtype=F64)
    result = entropic_ot(a, a, cost, solver="fast", **TIGHT)
    assert built and result.converged.all() and (result.iterations <= 30).all()
    reference = entropic_ot(a, a, cost, solver="pot", **TIGHT)
    torch.testing.assert_close(result.value, reference.value, rtol=0, atol=1e-9)
    for i in (0, 5):
        want = ot.sinkhorn2(a[i], a[i], cost[i], 0.1, method="sinkhorn_log", numItermax=200000, stopThr=1e-9)
        assert abs(float(result.transport_cost[i]) - float(want)) < 1e-5


def test_auto_sends_rows_with_a_wide_cost_span_to_pot_and_fast_refuses_them():
    a, b, cost = _problems(6, 5, 7, zeros=1, seed=6)
    a, b, cost = a.float(), b.float(), cost.float()
    cost[1] *= 5  # span / epsilon up to 50 > 30 in fp32: the exp-domain kernel would reach exp(-50)
    cost[4] *= 4
    auto = entropic_ot(a, b, cost, max_iter=2000, tol=1e-5)
    pot = entropic_ot(a, b, cost, max_iter=2000, tol=1e-5, solver="pot")
    assert auto.converged.all() and pot.converged.all()
    torch.testing.assert_close(auto.value, pot.value, rtol=0, atol=2e-5)
    torch.testing.assert_close(auto.iterations[[1, 4]], pot.iterations[[1, 4]], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"solver='fast' needs every row's cost span .* row 1; use solver='auto'"):
        entropic_ot(a, b, cost, solver="fast")
    with pytest.raises(ValueError, match=r"solver must be one of"):
        entropic_ot(a, b, cost, solver="exp")


def test_fast_and_pot_agree_on_realistic_fp32_rows():
    """Top-k rows with a lexical cost as in ``benchmarks/bench_sinkhorn.py``, large enough for the sparse kernel."""
    g = torch.Generator().manual_seed(3)
    vocab, k = 512, 16
    teacher = torch.randn(96, vocab, generator=g) * 4
    student = teacher + torch.randn(96, vocab, generator=g)

    def top(logits):
        p, ids = logits.double().softmax(-1).topk(k, -1)
        return torch.cat([p, (1 - p.sum(-1, keepdim=True)).clamp_min(0)], -1).float(), ids

    (a, t_ids), (b, s_ids) = top(teacher), top(student)
    neighbours = torch.randint(0, vocab, (vocab, 3), generator=g)
    cost = lexical_cost(t_ids, s_ids, exact_t2s=torch.arange(vocab), t2s_neighbours=neighbours,
                        t2s_neighbour_scores=torch.rand(vocab, 3, generator=g) * 0.8)
    assert 96 * (k + 1) ** 2 > transport.common._DENSE_TAIL
    built = []
    original = transport.fast_solver._Kernel.from_support.__func__
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(transport.fast_solver._Kernel, "from_support",
                      classmethod(lambda cls, *args, **kw: built.append(1) or original(cls, *args, **kw)))
        fast = entropic_ot(a, b, cost, solver="fast")
    pot = entropic_ot(a, b, cost, solver="pot")
    assert built  # the default thresholds pick the sparse kernel for a lexical cost
    assert fast.value.dtype == torch.float32 and fast.converged.float().mean() > 0.95
    assert (fast.converged == pot.converged).float().mean() > 0.95
    both = fast.converged & pot.converged
    assert (fast.value - pot.value)[both].abs().max() < 2e-4  # both stop within tol=1e-4 of the marginals
    tight = entropic_ot(a.double(), b.double(), cost.double(), max_iter=5000, tol=1e-10, solver="pot")
    assert (fast.value.double() - tight.value)[fast.converged].abs().max() < 2e-4


def test_negative_infinite_cost_is_named():
    a, b, cost = _problems(2, 3, 4)
    cost[1, 2, 0] = -math.inf
    for solver in ("auto", "pot"):
        with pytest.raises(ValueError, match=r"cost\[1, 2, 0\] = -inf"):
            entropic_ot(a, b, cost, solver=solver)


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


def _lexical_reference(teacher, student, tables) -> torch.Tensor:
    """The rules of :func:`lexical_cost`, pair by pair in Python floats."""
    exact, t2s_first, s2t_first = tables["exact_t2s"], tables.get("t2s_first"), tables.get("s2t_first")
    len_t, len_s = tables.get("teacher_lengths"), tables.get("student_lengths")
    t2s, t2s_score = tables.get("t2s_neighbours"), tables.get("t2s_neighbour_scores")
    s2t, s2t_score = tables.get("s2t_neighbours"), tables.get("s2t_neighbour_scores")
    rows, k, k2 = len(teacher), len(teacher[0]), len(student[0])
    out = torch.ones(rows, k + 1, k2 + 1, dtype=F64)
    out[:, k, k2] = 0
    for r in range(rows):
        for i, t in enumerate(teacher[r]):
            for j, s in enumerate(student[r]):
                if t < 0 or s < 0:
                    continue
                sim = 1.0 if int(exact[t]) == s else 0.0
                if t2s_first is not None and int(t2s_first[t]) == s:
                    sim = max(sim, min(1.0, float(len_s[s]) / max(1.0, float(len_t[t]))))
                if s2t_first is not None and int(s2t_first[s]) == t:
                    sim = max(sim, min(1.0, float(len_t[t]) / max(1.0, float(len_s[s]))))
                for c in range(0 if t2s is None else t2s.shape[1]):
                    if int(t2s[t, c]) == s:
                        sim = max(sim, float(t2s_score[t, c]))
                for c in range(0 if s2t is None else s2t.shape[1]):
                    if int(s2t[s, c]) == t:
                        sim = max(sim, float(s2t_score[s, c]))
                out[r, i, j] = 1 - min(1.0, max(0.0, sim))
    return out


@pytest.mark.parametrize("lookup", ["direct", "table"])
@pytest.mark.parametrize("which", ["exact", "first", "all"])
def test_lexical_cost_matches_a_slow_loop(monkeypatch, lookup, which):
    """Random small tables: repeated ids within a row, empty slots, -1 table entries, scores outside [0, 1]."""
    if lookup == "table":  # force the blocked map/table lookup, several blocks of rows
        monkeypatch.setattr(transport.common, "_DIRECT_LOOKUP", 0)
        monkeypatch.setattr(transport.common, "_LOOKUP_TABLE", 64)
    g = torch.Generator().manual_seed(12)
    vt, vs, rows = 23, 19, 9

    def ids(v, width):
        x = torch.randint(0, v, (rows, width), generator=g)
        x[torch.rand(rows, width, generator=g) < 0.1] = -1
        x[2, 1] = x[2, 4] = max(int(x[2, 4]), 0)  # a repeated id
        return x

    def partners(v_from, v_to, width=None):
        shape = (v_from,) if width is None else (v_from, width)
        x = torch.randint(0, v_to, shape, generator=g)
        x[torch.rand(shape, generator=g) < 0.3] = -1
        return x

    tables = {"exact_t2s": partners(vt, vs)}
    if which != "exact":
        tables.update(t2s_first=partners(vt, vs), s2t_first=partners(vs, vt),
                      teacher_lengths=torch.randint(0, 7, (vt,), generator=g),
                      student_lengths=torch.randint(0, 7, (vs,), generator=g))
    if which == "all":
        tables.update(t2s_neighbours=partners(vt, vs, 3), s2t_neighbours=partners(vs, vt, 2),
                      t2s_neighbour_scores=torch.rand(vt, 3, generator=g) * 1.4 - 0.2,
                      s2t_neighbour_scores=torch.rand(vs, 2, generator=g) * 1.4 - 0.2)
    teacher, student = ids(vt, 7), ids(vs, 6)
    teacher[5, 0] = teacher[5, 6] = 3
    want = _lexical_reference(teacher.tolist(), student.tolist(), tables)
    torch.testing.assert_close(lexical_cost(teacher, student, dtype=F64, **tables), want, rtol=0, atol=1e-12)
    torch.testing.assert_close(lexical_cost(teacher, student, **tables), want.float(), rtol=0, atol=1e-6)


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
