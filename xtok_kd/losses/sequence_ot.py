r"""Sequence-level transport between the teacher's and the student's positions (the optional term of MultiLevelOT).

MultiLevelOT (Cui et al., 2025) adds to its token-level transport a **sequence-level** one: each position of a
sequence is an atom described by its sorted top-``k`` probability vector, and the whole set of teacher positions is
transported onto the whole set of student positions. No alignment is needed: every teacher position may pair with
every student position, the plan decides which, so the term also works where aligned chunks are sparse.

For a sequence ``b`` with ``n`` valid teacher positions and ``m`` valid student positions:

* atom ``i`` (teacher) is :math:`x_i = \mathrm{sort}_\downarrow(\mathrm{softmax}(z^t_i / T))_{1..k}`, atom ``j``
  (student) likewise :math:`y_j`; a distribution over fewer than ``k`` tokens is zero-padded to ``k``;
* the cost is :math:`M_{ij} = \lVert x_i - y_j\rVert_1 \in [0, 2]`;
* the marginals are uniform: :math:`a = \mathbf 1_n / n`, :math:`b = \mathbf 1_m / m`;
* the term is :math:`\mathrm{OT}_\varepsilon(a, b) = \langle T^\star, M\rangle + \varepsilon\,\mathrm{KL}(T^\star \|
  ab^\top)`, solved by :func:`~xtok_kd.losses.transport.entropic_ot` for the whole batch at once; or, with
  ``unbiased=True``, the Sinkhorn divergence :math:`\mathrm{OT}_\varepsilon(a,b) - \tfrac12\mathrm{OT}_\varepsilon(a,a)
  - \tfrac12\mathrm{OT}_\varepsilon(b,b)`, which is 0 for identical sides and otherwise > 0 (the kernel
  :math:`e^{-\lVert x - y\rVert_1/\varepsilon}` is a product of Laplace kernels, positive definite).

Batching: each side's valid positions are packed to the front of a ``(R, N, k)`` block (``N`` the longest valid
count) and the padded slots get zero mass, so they take no part in the plan and receive no gradient. A sequence with
no valid position on either side gives value 0, converged True, and is not solved.

Gradients reach the student logits through the cost (envelope theorem: ``d value / d M = T``) and the sorted top-k
probabilities (``d p_(r) / d z``, the softmax Jacobian restricted to the ``k`` selected tokens); the teacher is a
constant. Memory: the top-k probabilities are computed over blocks of positions (one fp32 block of the vocabulary at
a time, never a full fp32 copy of the logits) and the costs take ``O(B Lt Ls)``; the L1 cost's backward walks the
``k`` ranks in groups instead of building the ``(B, Lt, Ls, k)`` tensor that ``torch.cdist``'s backward would.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from .transport import (
    DEFAULT_EPSILON,
    DEFAULT_MAX_ITER,
    DEFAULT_TOL,
    entropic_ot,
    sinkhorn_divergence,
)
from .types import TeacherTopK

__all__ = ["DEFAULT_SEQUENCE_TOP_K", "SequenceOT", "sequence_transport"]

#: Default length of the sorted probability vector that describes a position.
DEFAULT_SEQUENCE_TOP_K = 64
#: Elements per block when the sorted top-k probabilities are computed: (accelerators, CPU).
_BLOCK_ELEMENTS = (1 << 24, 1 << 20)
#: Elements of the ``(R, n, m, ranks)`` temporary in the L1 cost's backward.
_COST_GRAD_ELEMENTS = 1 << 24
#: A cached teacher row's probabilities may sum to 1 + this (rounding) before it is taken for raw logits.
_MASS_SLACK = 1e-2


class SequenceOT(NamedTuple):
    """Per-sequence result of :func:`sequence_transport`.

    Attributes:
        value: ``(B,)`` the entropic OT objective (or the Sinkhorn divergence with ``unbiased=True``); 0 for a
            sequence with no valid position on a side. The only differentiable field.
        transport_cost: ``(B,)`` :math:`\\langle T, M\\rangle` of the plan (the divergence: the same combination);
            detached.
        converged: ``(B,)`` bool, the plan's marginals are within ``tol`` (True for an unsolved, empty sequence).
        marginal_error: ``(B,)`` the larger L2 violation of the two marginals (0 when unsolved); detached.
        iterations: ``(B,)`` int64 Sinkhorn iterations (0 when unsolved).
        teacher_positions: ``(B,)`` int64 valid teacher positions (atoms) per sequence.
        student_positions: ``(B,)`` int64 valid student positions per sequence.
    """

    value: torch.Tensor
    transport_cost: torch.Tensor
    converged: torch.Tensor
    marginal_error: torch.Tensor
    iterations: torch.Tensor
    teacher_positions: torch.Tensor
    student_positions: torch.Tensor


# ----------------------------------------------------------------------------------------------------------------
# validation


def _check_knobs(top_k: Any, temperature: Any, epsilon: Any, max_iter: Any, tol: Any) -> float:
    """Raise naming a bad option and its fix; return the temperature as a float."""
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1:
        raise ValueError(f"top_k must be an int >= 1 (length of each position's sorted probability vector), got "
                         f"{top_k!r}; pass e.g. top_k={DEFAULT_SEQUENCE_TOP_K}")

    def real(x: Any) -> bool:
        return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(float(x))

    if not real(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}; pass e.g. temperature=1.0")
    if not real(epsilon) or epsilon <= 0:
        raise ValueError(f"epsilon must be a finite number > 0 (in cost units; the L1 costs lie in [0, 2]), got "
                         f"{epsilon!r}; pass e.g. epsilon={DEFAULT_EPSILON}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral) or max_iter < 1:
        raise ValueError(f"max_iter must be an int >= 1, got {max_iter!r}; pass e.g. max_iter={DEFAULT_MAX_ITER}")
    if not real(tol) or tol <= 0:
        raise ValueError(f"tol must be a finite number > 0 (L2 error of a marginal), got {tol!r}; pass e.g. "
                         f"tol={DEFAULT_TOL}")
    return float(temperature)


def _describe(x: Any) -> str:
    return f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def _check_logits(name: str, x: Any, batch: int | None) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 3:
        raise ValueError(f"{name} must be a floating-point tensor (B, L, V) of logits, got {_describe(x)}; pass the "
                         f"model's logits (add the batch dimension with unsqueeze(0) for one sequence)")
    if x.shape[-1] == 0:
        raise ValueError(f"{name} has an empty vocabulary axis, shape {tuple(x.shape)}; pass the logits over the "
                         f"whole vocabulary")
    if batch is not None and x.shape[0] != batch:
        raise ValueError(f"{name} has batch size {x.shape[0]} but student_logits has {batch}; pass the same "
                         f"sequences on both sides")


def _check_mask(name: str, mask: Any, batch: int, length: int, device: torch.device, owner: str) -> None:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor (B, L), got {_describe(mask)}; build it with e.g. "
                         f"attention_mask.bool()")
    if tuple(mask.shape) != (batch, length):
        raise ValueError(f"{name} has shape {tuple(mask.shape)} but {owner} needs ({batch}, {length}) (batch, "
                         f"positions); pass one flag per position of {owner}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but student_logits is on {device}; move it with .to(device)")


def _unpack_teacher(teacher: Any, batch: int, device: torch.device, temperature: float
                    ) -> tuple[torch.Tensor | None, tuple[torch.Tensor, torch.Tensor] | None]:
    """``(logits, None)`` or ``(None, (ids, logprobs))``, validated (shapes, dtypes, device)."""
    if isinstance(teacher, torch.Tensor):
        _check_logits("teacher", teacher, batch)
        if teacher.device != device:
            raise ValueError(f"teacher logits are on {teacher.device} but student_logits is on {device}; move them "
                             f"with .to(device)")
        return teacher, None
    if isinstance(teacher, TeacherTopK):
        ids, logprobs = teacher.ids, teacher.logprobs
    elif isinstance(teacher, Sequence) and not isinstance(teacher, str) and len(teacher) == 2:
        ids, logprobs = teacher
    else:
        raise ValueError(f"teacher must be logits (B, Lt, Vt) or a top-k pair (ids, logprobs) such as TeacherTopK, "
                         f"got {type(teacher).__name__}")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 3 or ids.is_floating_point() or ids.is_complex() \
            or ids.dtype == torch.bool:
        raise ValueError(f"teacher top-k ids must be an integer tensor (B, Lt, k) (-1 = empty slot), got "
                         f"{_describe(ids)}; pass the ids from topk")
    if not isinstance(logprobs, torch.Tensor) or not logprobs.is_floating_point() \
            or tuple(logprobs.shape) != tuple(ids.shape):
        raise ValueError(f"teacher top-k logprobs must be a floating-point tensor of the ids' shape "
                         f"{tuple(ids.shape)}, got {_describe(logprobs)}; pass log_softmax values gathered by topk")
    if ids.shape[0] != batch:
        raise ValueError(f"teacher top-k has batch size {ids.shape[0]} but student_logits has {batch}; pass the same "
                         f"sequences on both sides")
    if ids.shape[-1] == 0:
        raise ValueError(f"teacher top-k has no slots, shape {tuple(ids.shape)}; cache at least one token per "
                         f"position")
    if ids.device != device or logprobs.device != device:
        raise ValueError(f"teacher top-k is on {ids.device} / {logprobs.device} but student_logits is on {device}; "
                         f"move it with .to(device)")
    if temperature != 1.0:
        raise ValueError(f"a cached teacher top-k holds temperature-1 log-probabilities and cannot be re-tempered "
                         f"(the full softmax is gone), got temperature={temperature}; use temperature=1.0, or cache "
                         f"the top-k at the training temperature and pass temperature=1.0")
    return None, (ids, logprobs)


def _where(flat: int, length: int) -> str:
    return f"batch {flat // length}, position {flat % length}"


# ----------------------------------------------------------------------------------------------------------------
# sorted top-k probabilities


def _rows_per_block(vocab: int, device: torch.device) -> int:
    return max(1, _BLOCK_ELEMENTS[device.type == "cpu"] // vocab)


def _block_topk(z: torch.Tensor, k: int, temperature: float, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows ``z (r, V)`` -> descending probabilities ``(r, min(k, V))``, their token ids, log-partition ``(r,)``.

    ``topk`` runs on the logits in their own dtype (the softmax is monotone, and upcasting is exact); the
    log-partition is formed in ``dtype``.
    """
    top, idx = torch.topk(z, min(k, z.shape[-1]), dim=-1)
    lse = torch.logsumexp(z.to(dtype) / temperature, dim=-1)
    return torch.exp(top.to(dtype) / temperature - lse[:, None]), idx, lse


class _SortedTopKProbs(torch.autograd.Function):
    """``logits (B, L, V)`` and flat row indices ``(N,)`` -> ``(N, min(k, V))`` descending probabilities.

    Forward and backward walk blocks of rows, so only one block is ever upcast. Backward, with ``g`` the incoming
    gradient and ``p`` the probabilities of the selected ids ``i_r``:
    ``dL/dz_j = (1/T) (sum_r g_r p_r [j = i_r] - softmax_j sum_r g_r p_r)``.
    """

    @staticmethod
    def forward(ctx, logits, rows, k, temperature, dtype):  # type: ignore[override]
        flat = logits.reshape(-1, logits.shape[-1])
        step = _rows_per_block(flat.shape[1], flat.device)
        parts = [_block_topk(flat.index_select(0, rows[s:s + step]), k, temperature, dtype)
                 for s in range(0, rows.numel(), step)]
        if parts:
            probs, idx, lse = (torch.cat(p) for p in zip(*parts))
        else:
            width = min(k, flat.shape[1])
            probs = flat.new_zeros(0, width, dtype=dtype)
            idx = torch.zeros(0, width, dtype=torch.int64, device=flat.device)
            lse = flat.new_zeros(0, dtype=dtype)
        ctx.save_for_backward(logits, rows, idx, lse, probs)
        ctx.temperature = temperature
        return probs

    @staticmethod
    def backward(ctx, grad_probs):  # type: ignore[override]
        logits, rows, idx, lse, probs = ctx.saved_tensors
        temperature = ctx.temperature
        flat = logits.reshape(-1, logits.shape[-1])
        grad = torch.zeros_like(flat)
        weighted = grad_probs * probs  # (N, k): g_r p_r
        total = weighted.sum(-1, keepdim=True)
        step = _rows_per_block(flat.shape[1], flat.device)
        for s in range(0, rows.numel(), step):
            block = rows[s:s + step]
            soft = torch.exp(flat.index_select(0, block).to(probs.dtype) / temperature - lse[s:s + step, None])
            g = (-soft * total[s:s + step]).scatter_add_(1, idx[s:s + step], weighted[s:s + step]) / temperature
            grad.index_copy_(0, block, g.to(grad.dtype))
        return grad.view_as(logits), None, None, None, None


def _pad_to(x: torch.Tensor, k: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, k - x.shape[-1])) if x.shape[-1] < k else x


def _check_finite_probs(name: str, probs: torch.Tensor, rows: torch.Tensor, length: int) -> None:
    bad = ~torch.isfinite(probs).all(-1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"{name} at {_where(int(rows[i]), length)} give non-finite probabilities (NaN or +inf "
                         f"logits, or every logit -inf); fix the logits or mark the position False in the mask")


def _teacher_topk_probs(ids: torch.Tensor, logprobs: torch.Tensor, rows: torch.Tensor, k: int, dtype: torch.dtype
                        ) -> torch.Tensor:
    """``(N, k)`` descending probabilities of the cached rows ``rows``: empty slots are 0, fewer slots zero-padded."""
    width = ids.shape[-1]
    length = ids.shape[1]
    ids = ids.reshape(-1, width).index_select(0, rows)
    lp = logprobs.reshape(-1, width).index_select(0, rows).to(dtype).masked_fill(ids < 0, -math.inf)
    bad = torch.isnan(lp) | (lp > 1e-3)
    if bool(bad.any()):
        i, j = (int(x) for x in bad.nonzero()[0])
        raise ValueError(f"teacher top-k logprobs hold {lp[i, j].item()} at {_where(int(rows[i]), length)}, slot "
                         f"{j}; they must be log-probabilities (<= 0, -inf for a ruled-out token; log_softmax "
                         f"before topk), not NaN, +inf or raw logits")
    probs = lp.exp()
    mass = probs.sum(-1)
    over = mass > 1 + _MASS_SLACK
    if bool(over.any()):
        i = int(over.nonzero()[0])
        raise ValueError(f"teacher top-k probabilities at {_where(int(rows[i]), length)} sum to "
                         f"{mass[i].item():.4g} > 1; pass log-probabilities of the full softmax (log_softmax before "
                         f"topk), not raw logits")
    return _pad_to(torch.topk(probs, min(k, width), dim=-1).values, k)


# ----------------------------------------------------------------------------------------------------------------
# the L1 cost


class _L1Cost(torch.autograd.Function):
    """``x (R, n, k)``, ``y (R, m, k)`` -> ``(R, n, m)`` pairwise L1 distances.

    Forward is ``torch.cdist(p=1)``; backward ``dL/dy_jr = sum_i G_ij sign(y_jr - x_ir)`` (and the opposite for
    ``x``) walks the ranks in groups, so its temporary stays near ``_COST_GRAD_ELEMENTS`` instead of ``R n m k``.
    """

    @staticmethod
    def forward(ctx, x, y):  # type: ignore[override]
        ctx.save_for_backward(x, y)
        return torch.cdist(x, y, p=1)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, y = ctx.saved_tensors
        rows, n, k = x.shape
        m = y.shape[1]
        want_x, want_y = ctx.needs_input_grad[:2]
        grad_x = torch.zeros_like(x) if want_x else None
        grad_y = torch.zeros_like(y) if want_y else None
        group = max(1, _COST_GRAD_ELEMENTS // max(1, rows * n * m))
        for r in range(0, k, group):
            sign = torch.sign(y[:, None, :, r:r + group] - x[:, :, None, r:r + group])  # (R, n, m, g)
            weighted = sign.mul_(grad[..., None])
            if want_y:
                grad_y[..., r:r + group] = weighted.sum(1)
            if want_x:
                grad_x[..., r:r + group] = -weighted.sum(2)
        return grad_x, grad_y


def _l1_cost(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return _L1Cost.apply(x, y)


def _self_cost(x: torch.Tensor) -> torch.Tensor:
    """``(R, n, n)`` L1 self-cost, exactly symmetric (so :func:`entropic_ot` takes its symmetric path)."""
    cost = _l1_cost(x, x)
    return 0.5 * (cost + cost.transpose(1, 2))


# ----------------------------------------------------------------------------------------------------------------
# packing


def _pack(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``mask (R, L)`` -> flat rows of the valid positions ``(N,)`` (row-major), slot validity ``(R, Nmax)``, counts.

    Valid positions are moved to the front of each row in their order; ``slots[r, s]`` is True for the first
    ``counts[r]`` slots.
    """
    counts = mask.sum(1)
    longest = int(counts.max()) if counts.numel() else 0
    slots = torch.arange(longest, device=mask.device)[None, :] < counts[:, None]
    return mask.reshape(-1).nonzero().squeeze(1), slots, counts


def _scatter_slots(values: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``values (N, k)`` into a zero ``(R, Nmax, k)`` block at the True ``slots`` (row-major, matching ``_pack``)."""
    out = values.new_zeros(*slots.shape, values.shape[-1])
    return out.masked_scatter(slots[..., None], values)


# ----------------------------------------------------------------------------------------------------------------
# the term


def sequence_transport(
    student_logits: torch.Tensor,
    teacher: torch.Tensor | TeacherTopK | tuple[torch.Tensor, torch.Tensor],
    student_mask: torch.Tensor,
    teacher_mask: torch.Tensor,
    *,
    top_k: int = DEFAULT_SEQUENCE_TOP_K,
    temperature: float = 1.0,
    epsilon: float = DEFAULT_EPSILON,
    max_iter: int = DEFAULT_MAX_ITER,
    tol: float = DEFAULT_TOL,
    unbiased: bool = False,
) -> SequenceOT:
    r"""Entropic OT between each sequence's teacher positions and student positions (see the module docstring).

    Each valid position is the vector of its ``top_k`` largest probabilities at temperature ``T``, sorted descending
    (zero-padded when the distribution has fewer tokens, or a cached teacher fewer slots); the cost between teacher
    position ``i`` and student position ``j`` is the L1 distance of their vectors (in ``[0, 2]``); the marginals are
    uniform over each side's valid positions; the value is
    :math:`\langle T, M\rangle + \varepsilon\,\mathrm{KL}(T\|ab^\top)` per sequence (as in :func:`entropic_ot`), or
    with ``unbiased=True`` the Sinkhorn divergence (0 for identical sides).

    A cached teacher with ``k' < top_k`` slots is zero-padded rather than refused: its vectors then hold ``k'``
    probabilities and ``top_k - k'`` zeros, so each cost includes the student's mass at ranks ``k' + 1 .. top_k``
    (at most ``1 -`` the student's top-``k'`` mass). Pass ``top_k=k'`` to compare like with like. Empty slots
    (negative id) count as probability 0; ids are otherwise unused.

    Args:
        student_logits: ``(B, Ls, Vs)`` any float dtype; the math runs in fp32 (fp64 if the student logits or the
            teacher are fp64). Differentiable.
        teacher: ``(B, Lt, Vt)`` logits, or ``(ids, logprobs)`` each ``(B, Lt, k')`` (a
            :class:`~xtok_kd.losses.types.TeacherTopK`; empty slots id -1, logprob -inf; temperature-1
            log-probabilities, so ``temperature`` must be 1). A constant: no gradient flows into it.
        student_mask: ``(B, Ls)`` bool, the student positions that take part.
        teacher_mask: ``(B, Lt)`` bool, the teacher positions that take part. Masked positions are never read (their
            logits may hold anything) and get zero gradient.
        top_k: length of each position's sorted vector, ``>= 1``.
        temperature: ``T > 0`` applied to both sides' logits.
        epsilon: entropic regularisation in cost units (costs lie in ``[0, 2]``), ``> 0``.
        max_iter, tol: Sinkhorn iteration cap and marginal tolerance, as in :func:`entropic_ot`.
        unbiased: return :math:`\mathrm{OT}_\varepsilon(a,b) - \frac12\mathrm{OT}_\varepsilon(a,a)
            - \frac12\mathrm{OT}_\varepsilon(b,b)` (three problems) instead of :math:`\mathrm{OT}_\varepsilon(a,b)`.

    Returns:
        :class:`SequenceOT`, every field ``(B,)``; ``value`` in the working dtype, differentiable in
        ``student_logits``. A sequence with no valid position on a side: value 0, converged True, 0 iterations.

    Raises:
        ValueError: a bad option (``top_k``, ``temperature``, ``epsilon``, ``max_iter``, ``tol``), shape, dtype or
            device; a cached teacher with ``temperature != 1``; cached log-probabilities that are NaN, positive or sum
            above 1; non-finite probabilities at a valid position. Each message names the value and the fix.
    """
    temperature = _check_knobs(top_k, temperature, epsilon, max_iter, tol)
    top_k = int(top_k)
    _check_logits("student_logits", student_logits, None)
    batch, student_len, _ = student_logits.shape
    device = student_logits.device
    teacher_logits, cached = _unpack_teacher(teacher, batch, device, temperature)
    teacher_len = (teacher_logits if cached is None else cached[0]).shape[1]
    _check_mask("student_mask", student_mask, batch, student_len, device, "student_logits")
    _check_mask("teacher_mask", teacher_mask, batch, teacher_len, device, "the teacher")
    teacher_float = teacher_logits if cached is None else cached[1]
    dtype = torch.float64 if torch.float64 in (student_logits.dtype, teacher_float.dtype) else torch.float32

    t_counts, s_counts = teacher_mask.sum(1), student_mask.sum(1)
    solved = (t_counts > 0) & (s_counts > 0)
    value = student_logits.new_zeros(batch, dtype=dtype)
    transport = torch.zeros_like(value)
    converged = torch.ones(batch, dtype=torch.bool, device=device)
    error = torch.zeros_like(value)
    iterations = torch.zeros(batch, dtype=torch.int64, device=device)
    seqs = solved.nonzero().squeeze(1)
    if seqs.numel() == 0:
        # Keep the graph (a caller may backward through a batch with nothing to solve) without reading any logit.
        none = torch.zeros(0, dtype=torch.int64, device=device)
        value = value + _SortedTopKProbs.apply(student_logits, none, top_k, temperature, dtype).sum()
        return SequenceOT(value, transport, converged, error, iterations, t_counts, s_counts)

    t_rows, t_slots, t_n = _pack(teacher_mask.index_select(0, seqs))
    s_rows, s_slots, s_n = _pack(student_mask.index_select(0, seqs))
    # _pack numbered rows within the selected sequences; map them back to rows of the full (B * L) layout.
    t_rows = seqs[t_rows // teacher_len] * teacher_len + t_rows % teacher_len
    s_rows = seqs[s_rows // student_len] * student_len + s_rows % student_len

    s_probs = _SortedTopKProbs.apply(student_logits, s_rows, top_k, temperature, dtype)
    _check_finite_probs("student_logits", s_probs, s_rows, student_len)
    with torch.no_grad():
        if cached is None:
            t_probs = _SortedTopKProbs.apply(teacher_logits.detach(), t_rows, top_k, temperature, dtype)
            _check_finite_probs("teacher logits", t_probs, t_rows, teacher_len)
        else:
            t_probs = _teacher_topk_probs(cached[0], cached[1], t_rows, top_k, dtype)
    x = _scatter_slots(_pad_to(t_probs, top_k), t_slots)  # (R, Nt, k)
    y = _scatter_slots(_pad_to(s_probs, top_k), s_slots)  # (R, Ns, k)
    a = t_slots.to(dtype) / t_n[:, None].to(dtype)
    b = s_slots.to(dtype) / s_n[:, None].to(dtype)
    knobs = {"epsilon": float(epsilon), "max_iter": int(max_iter), "tol": float(tol)}
    if unbiased:
        result = sinkhorn_divergence(a, b, _l1_cost(x, y), _self_cost(x), _self_cost(y), **knobs)
    else:
        result = entropic_ot(a, b, _l1_cost(x, y), **knobs)

    value = value.index_put((seqs,), result.value)
    transport = transport.index_put((seqs,), result.transport_cost.detach())
    converged = converged.index_put((seqs,), result.converged)
    error = error.index_put((seqs,), result.marginal_error.detach())
    iterations = iterations.index_put((seqs,), result.iterations)
    return SequenceOT(value, transport, converged, error, iterations, t_counts, s_counts)
