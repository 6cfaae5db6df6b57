"""``mapping="projection"``: one side's distribution pushed through the vocabulary table into the other vocabulary,
then a divergence there. The default mapping, and the one that keeps token identity."""

from __future__ import annotations

from typing import Any

import torch

from ..block import Block
from ..divergences import LOG_FLOOR, divergence
from ..types import Direction
from .base import (
    MappingMethod,
    divergence_knobs,
    log_normalised,
    safe_log,
    scaled,
    teacher_logp,
)

__all__ = ["ProjectionMapping", "projection_rows"]


class ProjectionMapping(MappingMethod):
    """See :func:`projection_rows`. Buffers: the table's projection for ``direction`` in compact form."""

    name = "projection"
    metric_names = ("teacher_mass_mapped",)
    needs_table = True

    def buffers(self, table: Any, teacher_vocab_size: int | None,
                student_vocab_size: int | None) -> dict[str, torch.Tensor | None]:
        """The projection as ``src``/``dst``/``weight`` over the reachable target columns ``support``.

        Columns the projection never reaches are left out of the comparison (``support``, with ``compact_of`` the
        position of each target id among them, -1 outside); ``dst`` is expressed in those positions. With at most
        one entry per source id the dense form is kept (``src=None``: ``dst``/``weight`` indexed by source id), and
        with unit weights ``weight=None`` and unmapped sources point at a spare column.
        """
        direction = self.options.direction
        src, dst, weight = table.projection(direction)
        src = torch.as_tensor(src).long()
        dst = torch.as_tensor(dst).long()
        weight = torch.as_tensor(weight, dtype=torch.float32)
        to_teacher = direction == "student_to_teacher"
        width = teacher_vocab_size if to_teacher else student_vocab_size
        src_width = student_vocab_size if to_teacher else teacher_vocab_size
        reach = torch.zeros(width, dtype=torch.bool)
        reach[dst[weight > 0]] = True
        support = compact_of = None
        if not bool(reach.all()):  # compare on the reachable columns only: express dst as positions among them
            support = reach.nonzero().flatten()
            compact_of = torch.full((width,), -1, dtype=torch.long)
            compact_of[support] = torch.arange(support.shape[0])
            keep = reach[dst]
            src, weight, dst = src[keep], weight[keep], compact_of[dst[keep]]
        out: dict[str, torch.Tensor | None] = {"projection_src": src, "projection_dst": dst,
                                                "projection_weight": weight}
        if torch.unique(src).shape[0] == src.shape[0]:
            # At most one entry per source id: keep the dense form (no gather of source columns per block).
            dense_dst = torch.zeros(src_width, dtype=torch.long)
            dense_w: torch.Tensor | None = torch.zeros(src_width, dtype=torch.float32)
            dense_dst[src] = dst
            dense_w[src] = weight
            if bool((weight == 1).all()):  # unit weights: unmapped ids go to a spare column
                mapped = torch.zeros(src_width, dtype=torch.bool)
                mapped[src] = True
                dense_dst[~mapped] = width if support is None else support.shape[0]
                dense_w = None
            out = {"projection_src": None, "projection_dst": dense_dst, "projection_weight": dense_w}
        out["projection_support"] = support
        out["projection_compact_of"] = compact_of
        return out

    def rows(self, block: Block, buffers: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        o = self.options
        return projection_rows(
            block, src=buffers["projection_src"], dst=buffers["projection_dst"],
            weight=buffers["projection_weight"], support=buffers["projection_support"],
            compact_of=buffers["projection_compact_of"], direction=o.direction, knobs=divergence_knobs(o),
            tail=o.teacher_tail,
        )


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


def projection_rows(
    block: Block,
    *,
    src: torch.Tensor | None,
    dst: torch.Tensor,
    weight: torch.Tensor | None,
    support: torch.Tensor | None,
    compact_of: torch.Tensor | None,
    direction: Direction,
    knobs: dict[str, Any],
    tail: bool = False,
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

    ``tail`` (top-k teacher, ``student_to_teacher``): the ``k`` known columns keep their absolute probabilities and one
    tail atom is added on each side, ``1 - sum`` of the known ones (teacher: its mass off its top-k or outside
    ``S``; student: its projected mass off those columns, including tokens the table does not project), so the
    divergence runs over ``k + 1`` atoms of two distributions that each sum to 1.

    Metrics: ``teacher_mass_mapped`` (teacher mass that reaches the comparison, before renormalisation).
    """
    temp = block.temperature
    s_scaled = scaled(block.student_logits, temp)
    width = support.shape[0] if support is not None else None
    nothing = None
    if direction == "student_to_teacher":
        width = width or block.teacher_vocab_size
        q_proj = _push(torch.softmax(s_scaled, -1), src, dst, weight, width)
        if block.teacher_logits is not None:
            u = scaled(block.teacher_logits, temp)
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
            s_tilde = log_normalised(q_proj)
        else:
            ids, logp = block.teacher_topk_ids, block.teacher_topk_logp
            empty = ids < 0
            pos = ids if compact_of is None else compact_of[ids.clamp_min(0)]
            valid = (pos >= 0) & ~empty
            pos = pos.clamp_min(0)
            lse = torch.logsumexp(logp.masked_fill(~valid, float("-inf")), -1, keepdim=True)
            nothing = lse.squeeze(-1) == float("-inf")  # no known id in S (or all of them ruled out)
            lse_known = lse.masked_fill(nothing[:, None], 0.0)  # keep -inf - (-inf) out
            t_mass = lse.squeeze(-1).exp()
            if tail:
                t_tilde, s_tilde = _with_tail(logp, q_proj.gather(1, pos), valid)
            else:
                t_tilde = torch.where(valid, logp - lse_known, logp.new_tensor(LOG_FLOOR))
                s_tilde = log_normalised(q_proj.gather(1, pos), valid)
    else:
        width = width or block.student_logits.shape[-1]
        t_logp, known = teacher_logp(block)
        p_proj = _push(t_logp.exp(), src, dst, weight, width)
        t_mass = p_proj.sum(-1).detach()
        nothing = t_mass == 0  # the teacher's mass lies on ids the table does not map, or is ruled out there
        s_s = s_scaled if support is None else s_scaled.index_select(1, support)
        if known is None:
            t_tilde = log_normalised(p_proj)
            s_tilde = torch.log_softmax(s_s, -1)
        else:  # a top-k teacher reaches only some columns: compare there
            valid = p_proj > 0
            t_tilde = log_normalised(p_proj, valid)
            s_tilde = log_normalised(torch.softmax(s_s, -1), valid)
    loss = divergence(t_tilde, s_tilde, **knobs)
    if nothing is not None and bool(nothing.any()):  # no teacher mass reaches the comparison: the chunk gives 0
        loss = loss.masked_fill(nothing, 0.0)
    return loss, {"teacher_mass_mapped": t_mass.detach()}


def _with_tail(t_logp: torch.Tensor, q: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c, k + 1)`` log-probabilities of both sides: the ``valid`` known columns as they are, then the tail atom.

    ``t_logp`` ``(c, k)``: the teacher's top-k log-probabilities; ``q`` ``(c, k)``: the student's projected
    probabilities at those columns. Invalid columns get ``LOG_FLOOR`` on both sides (their mass is in the tails).
    The tails are ``1 - sum`` of the valid columns, floored at the smallest normal float so the log stays finite.
    """
    floor = LOG_FLOOR
    tiny = torch.finfo(q.dtype).tiny
    with torch.no_grad():
        t_sum = torch.logsumexp(t_logp.masked_fill(~valid, float("-inf")), -1).exp()
        t_tail = torch.log((1.0 - t_sum).clamp_min(tiny))
    q_known = q * valid
    q_tail = torch.log((1.0 - q_known.sum(-1)).clamp_min(tiny))
    t_cols = t_logp.masked_fill(~valid, floor)
    s_cols = safe_log(q_known).masked_fill(~valid, floor)
    return torch.cat([t_cols, t_tail[:, None]], -1), torch.cat([s_cols, q_tail[:, None]], -1)


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


