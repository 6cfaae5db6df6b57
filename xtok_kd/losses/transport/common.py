"""Shared pieces of the transport package: defaults, the result type, input checks."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

DEFAULT_EPSILON = 0.1
#: Default cap on Sinkhorn iterations per row.
DEFAULT_MAX_ITER = 300
#: Default tolerance on the L2 norm of each marginal's violation.
DEFAULT_TOL = 1e-4
#: Iterations per round of the active-set loop: after each round the converged rows leave the batch.
_ROUND = 10
#: A row's marginal may differ from 1 by this much (rounding of a softmax plus a tail atom in fp16/bf16 is ~1e-3).
_MASS_SLACK = 1e-2
#: Cost entries per block of rows solved together: (accelerators, CPU). On CPU 2**18 fp32 entries (1 MB per
#: temporary) measured fastest among 2**18 / 2**20 / 2**22 / unblocked: 2.6 / 3.7 / 4.0 / 8.9 s for 256 rows at
#: k=256, 0.87 / 0.91 / 1.09 / 1.12 s for 1,024 rows at k=64.
_BLOCK_ELEMENTS = (1 << 24, 1 << 18)
#: The same for the exp-domain solver's dense kernel, which keeps ``K`` and ``K^T`` (8 bytes per entry in fp32) for
#: all its iterations: on CPU a block should stay in L2 (2 MB per core here). Measured for 256 embedding-cost rows:
#: 2**16 / 2**17 / 2**18 / 2**20 entries took 113 / 99 / 93 / 91 ms at k=64 and 562 / 603 / 981 / 1,218 ms at
#: k=256 (one 257 x 257 row per block is the fastest there).
_FAST_BLOCK_ELEMENTS = (1 << 24, 1 << 17)
#: Log-scaling that stands for -inf (a zero-mass atom) between rounds: exp() of it is 0, adding to it never overflows.
_FAR = -1e30
#: Largest cost span of a row, ``(max M - min M) / epsilon``, that the exp-domain solver takes, by dtype: its kernel
#: entries stay >= exp(-span) (normal floats, 1e-13 in fp32) and its scalings within about exp(+-span).
_FAST_SPAN = {torch.float32: 30.0, torch.float64: 300.0}
#: The exp-domain solver keeps the kernel sparse when at most this share of the entries lie below their row's
#: largest cost (a lexical cost at k=64: ~1%; an embedding cost: ~100%; the scan also gives up early when more than
#: half of its grid columns hold such an entry, i.e. from ~4% for scattered entries).
_SPARSE_DENSITY = 0.1
#: Rows of the grid the support scan reduces the flat costs to (see ``_sparse_support``).
_GROUP = 16
#: Up to this many kernel entries among the rows still iterating (or one row of up to 2**17), a sparse kernel is
#: densified: a dense product is 2 operations instead of 5, and the last slow rows are all per-operation overhead.
#: Measured at k=64: dense is faster with 3 rows or fewer left (18 vs 23 us per iteration), slower with 7 (40 vs 23).
_DENSE_TAIL = 1 << 14
#: A sparse kernel with at most this many stored entries uses ``take`` / ``put_`` (fewer calls, slower kernels).
_SMALL_NNZ = 2048
#: Entries of the (rows x rows * k2) slot table of ``_lookup_slots``, per block of rows.
_LOOKUP_TABLE = 1 << 18
#: Up to this many id comparisons, ``_lookup_slots`` compares each query with its row's ids instead of using its table.
_DIRECT_LOOKUP = 1 << 19
#: The solvers ``entropic_ot`` accepts.
_SOLVERS = ("auto", "fast", "pot")


class TransportResult(NamedTuple):
    """Per-row result of :func:`entropic_ot` or :func:`sinkhorn_divergence`.

    Attributes:
        value: ``(R,)`` the entropic objective :math:`\\langle T, M\\rangle + \\varepsilon\\,\\mathrm{KL}(T\\|ab^\\top)`
            (or the debiased combination for the divergence); the only differentiable field.
        transport_cost: ``(R,)`` :math:`\\langle T, M\\rangle` of the entropic plan (what ``ot.sinkhorn2`` returns);
            detached.
        converged: ``(R,)`` bool, the returned plan's marginal error is ``<= tol`` (measured; for the divergence, all
            three problems).
        marginal_error: ``(R,)`` the larger of ``||T 1 - a||_2`` and ``||T^T 1 - b||_2`` (the divergence: the
            largest over its three problems); detached.
        iterations: ``(R,)`` int64 Sinkhorn iterations each row received (the divergence: the most of its three).
    """

    value: torch.Tensor
    transport_cost: torch.Tensor
    converged: torch.Tensor
    marginal_error: torch.Tensor
    iterations: torch.Tensor


# ----------------------------------------------------------------------------------------------------------------
# validation


def _check_knobs(epsilon: float, max_iter: int, tol: float) -> None:
    """Raise ``ValueError`` / ``TypeError`` naming a bad solver knob and the fix."""
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not math.isfinite(epsilon) \
            or epsilon <= 0:
        raise ValueError(f"epsilon must be a finite number > 0 (in cost units; costs lie in [0, 1]), got "
                         f"{epsilon!r}; pass e.g. epsilon={DEFAULT_EPSILON}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an int >= 1, got {max_iter!r}; pass e.g. max_iter={DEFAULT_MAX_ITER}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol <= 0:
        raise ValueError(f"tol must be a finite number > 0 (L2 error of a marginal), got {tol!r}; pass e.g. "
                         f"tol={DEFAULT_TOL}")


def _check_shapes(a: torch.Tensor, b: torch.Tensor, cost: torch.Tensor) -> None:
    """Shapes ``(R, n)``, ``(R, m)``, ``(R, n, m)``, floating dtypes, one device; raise naming what differs."""
    for name, t in (("a", a), ("b", b), ("cost", cost)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            kind = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"{name} must be a floating-point tensor, got {kind}; convert it with .float()")
    if a.dim() != 2 or b.dim() != 2 or cost.dim() != 3:
        raise ValueError(f"expected a (R, n), b (R, m) and cost (R, n, m), got a {tuple(a.shape)}, b "
                         f"{tuple(b.shape)}, cost {tuple(cost.shape)}; add the row dimension (unsqueeze(0)) for "
                         f"a single problem")
    want = (a.shape[0], a.shape[1], b.shape[1])
    if b.shape[0] != a.shape[0] or tuple(cost.shape) != want:
        raise ValueError(f"shape mismatch: a {tuple(a.shape)} and b {tuple(b.shape)} need cost {want}, got cost "
                         f"{tuple(cost.shape)} (rows R, then the a atoms, then the b atoms)")
    if a.shape[1] == 0 or b.shape[1] == 0:
        raise ValueError(f"each side needs at least one atom, got a {tuple(a.shape)}, b {tuple(b.shape)}; keep the "
                         f"tail atom")
    if not (a.device == b.device == cost.device):
        raise ValueError(f"a, b and cost must be on one device, got {a.device}, {b.device}, {cost.device}; move them "
                         f"with .to(device)")


def _check_values(a: torch.Tensor, b: torch.Tensor, cost: torch.Tensor) -> torch.Tensor:
    """Finite non-negative marginals summing to 1, costs without NaN or +inf: one host sync, details only on failure.

    Returns each row's largest cost ``(R,)``: the solver needs it, and it doubles as the check (``amax`` propagates
    NaN and +inf; ``isfinite`` over every entry was 10x slower on CPU). ``-inf`` costs are caught with each row's
    smallest cost, in ``_solve`` (:func:`_raise_non_finite_cost`).
    """
    hi = cost.reshape(cost.shape[0], -1).amax(1)
    bad = torch.stack([
        (~torch.isfinite(a) | (a < 0)).any(), (~torch.isfinite(b) | (b < 0)).any(),
        ((a.sum(1) - 1).abs() > _MASS_SLACK).any(), ((b.sum(1) - 1).abs() > _MASS_SLACK).any(),
        ~torch.isfinite(hi).all(),
    ]).tolist()
    for flag, name, t in ((bad[0], "a", a), (bad[1], "b", b)):
        if flag:
            row, col = (~torch.isfinite(t) | (t < 0)).nonzero()[0].tolist()
            raise ValueError(f"marginal {name} must be finite and >= 0, got {name}[{row}, {col}] = "
                             f"{t[row, col].item()!r}; pass probabilities (softmax), not logits, and drop masked rows")
    for flag, name, t in ((bad[2], "a", a), (bad[3], "b", b)):
        if flag:
            sums = t.sum(1)
            row = int(((sums - 1).abs() > _MASS_SLACK).nonzero()[0])
            raise ValueError(f"each row of {name} must sum to 1 (top-k plus the tail atom), got {name}[{row}].sum() = "
                             f"{sums[row].item():.6g}; append the tail atom 1 - topk.sum(-1) as the last atom")
    if bad[4]:
        _raise_non_finite_cost(cost)
    return hi


def _raise_non_finite_cost(cost: torch.Tensor) -> None:
    idx = (~torch.isfinite(cost)).nonzero()[0].tolist()
    raise ValueError(f"cost must be finite, got cost[{idx[0]}, {idx[1]}, {idx[2]}] = "
                     f"{cost[tuple(idx)].item()!r}; use a large finite cost (e.g. 1) for impossible pairs")


def _work_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp64 if any input is fp64, else fp32 (bf16/fp16 inputs are solved in fp32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
