"""Sorted-probability L1 (ULD, Boizard et al. 2024): compare two distributions by rank, not by token.

``ULD(p, q) = sum_r |p_(r) - q_(r)|`` where ``p_(1) >= p_(2) >= ...`` are ``p``'s probabilities sorted in descending
order, the shorter vector zero-padded to the longer. It needs no vocabulary mapping at all, which is also its
weakness: a token's identity never reaches the loss. Prefer the projection or hybrid mappings where a table exists;
use ULD when nothing maps (unrelated vocabularies) or to reproduce ULD / GOLD.

Two forms:

* :func:`sorted_l1` sorts the full rows (exact, ``O(V log V)`` per row);
* :func:`sorted_l1_topk` compares the ``k`` largest entries and the two tail masses ``tail = mass - sum(head)``:
  ``approx = sum_{r<=k} |p_(r) - q_(r)| + |tail_p - tail_q|``. Since ``|tail_p - tail_q| <= sum_{r>k} |p_(r) -
  q_(r)| <= tail_p + tail_q``, the exact value lies in ``[approx, approx + 2 * min(tail_p, tail_q)]``; that width is
  returned as the approximation bound.
"""

from __future__ import annotations

import torch

__all__ = ["sorted_l1", "sorted_l1_topk"]


def _sorted_desc(x: torch.Tensor) -> torch.Tensor:
    if x.requires_grad:
        return torch.sort(x, dim=-1, descending=True).values
    with torch.no_grad():
        return torch.sort(x, dim=-1, descending=True).values


def sorted_l1(teacher_probs: torch.Tensor, student_probs: torch.Tensor) -> torch.Tensor:
    """Exact sorted L1 between rows of two distributions with possibly different widths.

    Args:
        teacher_probs: ``(N, Vt)`` probabilities (rows may be unnormalised, e.g. GOLD-merged chunks).
        student_probs: ``(N, Vs)``.

    Returns:
        ``(N,)``: ``sum_r |p_(r) - q_(r)|`` over ``max(Vt, Vs)`` ranks (zero padding).
    """
    if teacher_probs.shape[0] != student_probs.shape[0]:
        raise ValueError(f"row counts differ: teacher {teacher_probs.shape[0]}, student {student_probs.shape[0]}")
    p = _sorted_desc(teacher_probs)
    q = _sorted_desc(student_probs)
    n = min(p.shape[-1], q.shape[-1])
    return (p[:, :n] - q[:, :n]).abs().sum(-1) + p[:, n:].sum(-1) + q[:, n:].sum(-1)


def _head(x: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` largest entries of each row, descending, zero-padded to ``k`` when the row is narrower."""
    kk = min(k, x.shape[-1])
    vals = torch.topk(x, kk, dim=-1).values
    if kk < k:
        vals = torch.nn.functional.pad(vals, (0, k - kk))
    return vals


def sorted_l1_topk(
    teacher_probs: torch.Tensor,
    student_probs: torch.Tensor,
    *,
    k: int,
    teacher_mass: torch.Tensor | None = None,
    student_mass: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` sorted L1 with the tail masses compared as one entry, and its approximation bound.

    Args:
        teacher_probs: ``(N, Vt)`` probabilities, or just the teacher's head (e.g. cached top-k) with ``teacher_mass``.
        student_probs: ``(N, Vs)``.
        k: number of ranks compared one by one (``k >= 1``); rows narrower than ``k`` are zero-padded.
        teacher_mass / student_mass: ``(N,)`` total mass of each row when the input is only a head (a cached top-k);
            None: the rows are complete and their sums are the masses.

    Returns:
        ``(loss (N,), bound (N,))``: the exact sorted L1 lies in ``[loss, loss + bound]``;
        ``bound = 2 * min(tail_p, tail_q)``, 0 when ``k`` covers both rows.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    p = _head(teacher_probs, k)
    q = _head(student_probs, k)
    p_mass = teacher_probs.sum(-1) if teacher_mass is None else teacher_mass
    q_mass = student_probs.sum(-1) if student_mass is None else student_mass
    # A head that covers the whole row leaves no tail (exactly 0, not a rounding residue).
    p_tail = (p_mass - p.sum(-1)).clamp_min(0.0) * float(teacher_mass is not None or k < teacher_probs.shape[-1])
    q_tail = (q_mass - q.sum(-1)).clamp_min(0.0) * float(student_mass is not None or k < student_probs.shape[-1])
    loss = (p - q).abs().sum(-1) + (p_tail - q_tail).abs()
    bound = 2.0 * torch.minimum(p_tail, q_tail).detach()
    return loss, bound
