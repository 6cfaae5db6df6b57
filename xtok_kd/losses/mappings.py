"""Vocabulary mappings: how one block of aligned teacher and student rows becomes per-chunk losses.

Each mapping takes a :class:`Block` (the aligned rows of up to ``chunk_size`` chunks, already gathered, sliced to the
tokenizers' vocabularies and cast to fp32, or fp64 for fp64 logits) and returns ``(loss (c,), metrics)`` where
``metrics`` maps a name to ``(c,)`` values. The engine (:mod:`xtok_kd.losses.engine`) differentiates the result
per block; nothing here keeps state.

* :func:`projection_rows` pushes one side's distribution through the vocabulary table into the other vocabulary
  and applies a divergence there;
* :func:`uld_rows` compares sorted probabilities (no mapping);
* :func:`hybrid_rows` is GOLD's hybrid: a divergence on exactly matched columns plus sorted L1 on the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .divergences import LOG_FLOOR, DivergenceName, divergence
from .types import Direction
from .uld import sorted_l1, sorted_l1_topk

__all__ = ["Block", "Direction", "hybrid_rows", "projection_rows", "teacher_logp", "uld_rows"]



@dataclass
class Block:
    """Aligned rows of ``c`` chunks.

    Attributes:
        student_logits: ``(c, Vs)`` the student's aligned rows (the engine differentiates with respect to them).
        teacher_logits: ``(c, Vt)`` the teacher's aligned rows, or None when the teacher is given as top-k.
        teacher_topk_ids / teacher_topk_logp: ``(c, k)`` cached teacher top-k (ids and log-probabilities), or None.
            A negative id is an empty slot; its log-probability is ``-inf`` (the module sets it so).
        teacher_vocab_size: ``Vt`` (needed to densify a top-k teacher).
        student_factor / teacher_factor: ``(c,)`` log of the chunk-merge factor (sum of the log-probabilities of
            the chunk's other actual tokens, see ``merge``), or None for no merge.
        temperature: ``T``; logits are divided by it before the softmax.
    """

    student_logits: torch.Tensor
    teacher_logits: torch.Tensor | None
    teacher_topk_ids: torch.Tensor | None
    teacher_topk_logp: torch.Tensor | None
    teacher_vocab_size: int
    student_factor: torch.Tensor | None
    teacher_factor: torch.Tensor | None
    temperature: float


def teacher_logp(block: Block) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Teacher log-probabilities ``(c, Vt)`` and, for a top-k teacher, the ``(c, Vt)`` mask of its known columns.

    A top-k teacher is densified: unknown columns get :data:`LOG_FLOOR` (probability 0); empty slots (negative
    ids) land in a spare column that is cut off.
    """
    if block.teacher_logits is not None:
        return torch.log_softmax(_scaled(block.teacher_logits, block.temperature), -1), None
    ids, logp = block.teacher_topk_ids, block.teacher_topk_logp
    if ids is None or logp is None:
        raise ValueError("a block needs teacher logits or a teacher top-k")
    c, v = ids.shape[0], block.teacher_vocab_size
    slot = ids.masked_fill(ids < 0, v)
    dense = logp.new_full((c, v + 1), LOG_FLOOR).scatter_(1, slot, logp)[:, :v]
    known = torch.zeros(c, v + 1, dtype=torch.bool, device=ids.device).scatter_(1, slot, True)[:, :v]
    return dense, known


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits if temperature == 1.0 else logits / temperature


def _push(probs: torch.Tensor, src: torch.Tensor | None, dst: torch.Tensor, weight: torch.Tensor | None,
          width: int) -> torch.Tensor:
    """``out[:, dst] += probs[:, src] * weight``: a distribution pushed through the table's COO projection.

    ``src=None`` is the dense form of a projection with at most one entry per source id: ``dst``/``weight`` are
    indexed by source id (weight 0 for unmapped ids), which saves gathering the source columns. ``weight=None``
    (dense form, every weight 1) sends unmapped ids to column ``width``, which is dropped: no multiply at all.
    """
    if weight is None:  # dense form with unit weights; unmapped sources point at a spare column, cut off after
        out = probs.new_zeros(probs.shape[0], width + 1).scatter_add_(1, dst.expand(probs.shape[0], -1), probs)
        return out[:, :width]
    vals = (probs if src is None else probs.index_select(1, src)) * weight.to(probs.dtype)
    return probs.new_zeros(probs.shape[0], width).scatter_add_(1, dst.expand(probs.shape[0], -1), vals)


class _Log(torch.autograd.Function):
    """``log(x)`` for ``x >= 0`` (0 gives ``-inf``) whose gradient at ``x = 0`` is 0 rather than NaN or inf."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return torch.log(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return (grad / x).masked_fill_(x == 0, 0.0)  # in place: one (c, V) temporary, as the plain log has


def _log_normalised(x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """``log(x / sum(x))`` per row for non-negative ``x`` (exact: a 0 gives ``-inf``); with ``valid``, only over valid
    columns (others floored). A row summing to 0 gives ``-inf`` (or the floor) everywhere, never NaN."""
    if valid is not None:
        x = x * valid
    total = x.sum(-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    logx = _Log.apply(x) - torch.log(total)
    return logx if valid is None else torch.where(valid, logx, logx.new_tensor(LOG_FLOOR))


def projection_rows(
    block: Block,
    *,
    src: torch.Tensor | None,
    dst: torch.Tensor,
    weight: torch.Tensor | None,
    support: torch.Tensor | None,
    compact_of: torch.Tensor | None,
    direction: Direction,
    divergence_name: DivergenceName,
    beta: float,
    alpha: float,
    mu: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Projection mapping: divergence between the native and the projected distribution in one vocabulary.

    ``student_to_teacher`` (default): ``q~ = P(q)`` with ``P(q)[:, dst] += q[:, src] * w`` (the table's COO, source =
    student); the comparison runs over the teacher columns ``S`` the projection reaches (and the teacher's top-k
    when cached), both distributions renormalised there: ``D(p|S / p(S), q~|S / q~(S))``. Every student token
    reaches the loss through the teacher token its text starts with (Llama's "123" counts towards Qwen's "1").
    ``teacher_to_student``: ``p~ = P(p)`` pushed into the student vocabulary, compared over the student columns it
    reaches; student mass outside those columns is not penalised, which is why it is not the default.

    ``support`` ``(|S|,)`` lists the reachable target columns (None: all of them) and ``dst`` is already expressed
    in positions of ``support``; ``compact_of`` ``(V_target,)`` maps a target id to its position (-1 outside).
    The comparison runs on the ``(c, |S|)`` compacted columns, never on masks over the full width.

    A top-k teacher's empty slots (negative ids) and ids outside ``S`` are left out of the comparison. A chunk where
    no teacher mass reaches the comparison (every column there ruled out with ``-inf``, or no known top-k id in it)
    has nothing to compare: its loss is 0, with no gradient.

    Metrics: ``teacher_mass_mapped`` (teacher mass that reaches the comparison, before renormalisation).
    """
    temp = block.temperature
    s_scaled = _scaled(block.student_logits, temp)
    width = support.shape[0] if support is not None else None
    nothing = None
    if direction == "student_to_teacher":
        width = width or block.teacher_vocab_size
        q_proj = _push(torch.softmax(s_scaled, -1), src, dst, weight, width)
        if block.teacher_logits is not None:
            u = _scaled(block.teacher_logits, temp)
            u_s = u if support is None else u.index_select(1, support)
            t_tilde = torch.log_softmax(u_s, -1)
            with torch.no_grad():  # mass on S = exp(lse_S - lse_all); lse_S read off the log-softmax
                if support is None:
                    t_mass = torch.ones_like(u[:, 0])
                else:
                    lse_s = u_s[:, 0] - t_tilde[:, 0]
                    redo = ~torch.isfinite(lse_s)  # column 0 ruled out (-inf), or no mass on S at all
                    if bool(redo.any()):
                        lse_s[redo] = torch.logsumexp(u_s[redo], -1)
                        nothing = lse_s == float("-inf")  # the teacher rules out every column of S
                        t_tilde = t_tilde.masked_fill(nothing[:, None], LOG_FLOOR)
                    lse_all = _lse_shifted(u, lse_s)
                    t_mass = (lse_s - lse_all).exp()
                    # +inf outside S: NaN, so that the engine reports it (exp(lse_S - inf) would read as mass 0)
                    t_mass = t_mass.masked_fill(lse_all == float("inf"), float("nan"))
            s_tilde = _log_normalised(q_proj)
        else:
            ids, logp = block.teacher_topk_ids, block.teacher_topk_logp
            empty = ids < 0
            pos = ids if compact_of is None else compact_of[ids.clamp_min(0)]
            valid = (pos >= 0) & ~empty
            pos = pos.clamp_min(0)
            lse = torch.logsumexp(logp.masked_fill(~valid, float("-inf")), -1, keepdim=True)
            nothing = lse.squeeze(-1) == float("-inf")  # no known id in S (or all of them ruled out)
            lse_known = lse.masked_fill(nothing[:, None], 0.0)  # keep -inf - (-inf) out
            t_tilde = torch.where(valid, logp - lse_known, logp.new_tensor(LOG_FLOOR))
            t_mass = lse.squeeze(-1).exp()
            s_tilde = _log_normalised(q_proj.gather(1, pos), valid)
    else:
        width = width or block.student_logits.shape[-1]
        t_logp, known = teacher_logp(block)
        p_proj = _push(t_logp.exp(), src, dst, weight, width)
        t_mass = p_proj.sum(-1).detach()
        nothing = t_mass == 0  # the teacher's mass lies on ids the table does not map, or is ruled out there
        s_s = s_scaled if support is None else s_scaled.index_select(1, support)
        if known is None:
            t_tilde = _log_normalised(p_proj)
            s_tilde = torch.log_softmax(s_s, -1)
        else:  # a top-k teacher reaches only some columns: compare there
            valid = p_proj > 0
            t_tilde = _log_normalised(p_proj, valid)
            s_tilde = _log_normalised(torch.softmax(s_s, -1), valid)
    loss = divergence(t_tilde, s_tilde, kind=divergence_name, beta=beta, alpha=alpha, mu=mu)
    if nothing is not None and bool(nothing.any()):  # no teacher mass reaches the comparison: the chunk gives 0
        loss = loss.masked_fill(nothing, 0.0)
    return loss, {"teacher_mass_mapped": t_mass.detach()}


def _lse_shifted(u: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``logsumexp(u, -1)`` shifted by a known finite per-row value (the log-mass on the support) instead of the row
    maximum: three passes over the row instead of four. Rows where that overflows (a logit outside the support above
    ``shift + 88``), or ``shift`` is not finite, are redone with ``torch.logsumexp``."""
    ok = torch.isfinite(shift)
    lse = shift + (u - shift.masked_fill(~ok, 0.0)[:, None]).exp_().sum(-1).log()
    redo = ~(ok & torch.isfinite(lse))
    if bool(redo.any()):
        lse[redo] = torch.logsumexp(u[redo], -1)
    return lse


def _merged_probs(logp: torch.Tensor, factor: torch.Tensor | None) -> torch.Tensor:
    return (logp if factor is None else logp + factor[:, None]).exp()


def uld_rows(block: Block, *, top_k: int | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ULD mapping: sorted-probability L1 between the (merged) rows; exact, or top-k with its bound.

    With ``top_k`` (or a cached top-k teacher) the metric ``uld_bound`` is the width of the interval holding the
    exact value (see :func:`~xtok_kd.losses.uld.sorted_l1_topk`); it is 0 for the exact form. A cached top-k's empty
    slots are left out: each row compares as many ranks as it has known ids.
    """
    s_logp = torch.log_softmax(_scaled(block.student_logits, block.temperature), -1)
    q = _merged_probs(s_logp, block.student_factor)
    if block.teacher_logits is not None:
        p = _merged_probs(torch.log_softmax(_scaled(block.teacher_logits, block.temperature), -1), block.teacher_factor)
        if top_k is None:
            loss = sorted_l1(p, q)
            return loss, {"uld_bound": torch.zeros_like(loss).detach()}
        p_mass = None  # complete rows: their sums are the masses
    else:
        if block.teacher_topk_logp is None or block.teacher_topk_ids is None:
            raise ValueError("a block needs teacher logits or a teacher top-k")
        p = _merged_probs(block.teacher_topk_logp, block.teacher_factor)  # empty slots hold -inf: probability 0
        p_mass = torch.ones_like(p[:, 0]) if block.teacher_factor is None else block.teacher_factor.exp()
        known = (block.teacher_topk_ids >= 0).sum(-1)
        top_k = min(top_k or p.shape[-1], p.shape[-1])
        loss, bound = sorted_l1_topk(p, q, k=top_k, teacher_mass=p_mass, teacher_known=known)
        return loss, {"uld_bound": bound}
    loss, bound = sorted_l1_topk(p, q, k=top_k, teacher_mass=p_mass)
    return loss, {"uld_bound": bound}


def hybrid_rows(
    block: Block,
    *,
    teacher_matched: torch.Tensor,
    student_matched: torch.Tensor,
    teacher_unmatched: torch.Tensor,
    student_unmatched: torch.Tensor,
    matched_weight: float,
    unmatched_weight: float,
    prob_floor: float,
    divergence_name: DivergenceName,
    beta: float,
    alpha: float,
    mu: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GOLD's hybrid mapping: a divergence on exactly matched columns plus sorted L1 on all other columns.

    ``loss = w_m * D(log max(p[:, T_m], eps), log max(q[:, S_m], eps)) + w_u * ULD(p[:, ~T_m], q[:, ~S_m])`` with
    ``(T_m, S_m)`` the matched pairs, ``p``/``q`` the (merged, unnormalised) rows, ``eps = prob_floor`` and by default
    ``w_m = |T_m| / Vt``, ``w_u = 1 - w_m``, as GOLD does. The matched columns are not renormalised (as in GOLD).

    Metrics: ``teacher_mass_matched`` (share of the teacher row's mass on matched columns).
    """
    if block.teacher_logits is None:
        raise ValueError("mapping='hybrid' needs full teacher logits, not a cached top-k")
    p = _merged_probs(torch.log_softmax(_scaled(block.teacher_logits, block.temperature), -1), block.teacher_factor)
    q = _merged_probs(torch.log_softmax(_scaled(block.student_logits, block.temperature), -1), block.student_factor)
    matched = divergence(
        torch.log(p[:, teacher_matched].clamp_min(prob_floor)),
        torch.log(q[:, student_matched].clamp_min(prob_floor)),
        kind=divergence_name, beta=beta, alpha=alpha, mu=mu,
    )
    if teacher_unmatched.numel() and student_unmatched.numel():
        unmatched = sorted_l1(p[:, teacher_unmatched], q[:, student_unmatched])
    else:
        unmatched = torch.zeros_like(matched)
    loss = matched_weight * matched + unmatched_weight * unmatched
    share = (p[:, teacher_matched].sum(-1) / p.sum(-1)).detach()
    return loss, {"teacher_mass_matched": share}
