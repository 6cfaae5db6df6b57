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
from typing import Literal

import torch

from .divergences import LOG_FLOOR, DivergenceName, divergence
from .uld import sorted_l1, sorted_l1_topk

__all__ = ["Block", "Direction", "hybrid_rows", "projection_rows", "teacher_logp", "uld_rows"]

Direction = Literal["student_to_teacher", "teacher_to_student"]


@dataclass
class Block:
    """Aligned rows of ``c`` chunks.

    Attributes:
        student_logits: ``(c, Vs)`` the student's aligned rows (the engine differentiates with respect to them).
        teacher_logits: ``(c, Vt)`` the teacher's aligned rows, or None when the teacher is given as top-k.
        teacher_topk_ids / teacher_topk_logp: ``(c, k)`` cached teacher top-k (ids and log-probabilities), or None.
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

    A top-k teacher is densified: unknown columns get :data:`LOG_FLOOR` (probability 0).
    """
    if block.teacher_logits is not None:
        return torch.log_softmax(block.teacher_logits / block.temperature, -1), None
    ids, logp = block.teacher_topk_ids, block.teacher_topk_logp
    assert ids is not None and logp is not None  # the engine passes one form or the other
    c = ids.shape[0]
    dense = logp.new_full((c, block.teacher_vocab_size), LOG_FLOOR).scatter_(1, ids, logp)
    known = torch.zeros(c, block.teacher_vocab_size, dtype=torch.bool, device=ids.device).scatter_(1, ids, True)
    return dense, known


def _renormalised_log(logp: torch.Tensor, support: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``log`` of a distribution restricted to ``support`` and renormalised there; and its mass on the support."""
    if support is None:
        lse = torch.logsumexp(logp, -1)
        return logp - lse[:, None], lse.exp()
    lse = torch.logsumexp(logp.masked_fill(~support, float("-inf")), -1)
    return torch.where(support, logp - lse[:, None], logp.new_tensor(LOG_FLOOR)), lse.exp()


def _push(probs: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, weight: torch.Tensor, width: int) -> torch.Tensor:
    """``out[:, dst] += probs[:, src] * weight``: a distribution pushed through the table's COO projection."""
    out = probs.new_zeros(probs.shape[0], width)
    return out.index_add_(1, dst, probs[:, src] * weight.to(probs.dtype))


def _log_clamped(x: torch.Tensor) -> torch.Tensor:
    return torch.log(x.clamp_min(torch.finfo(x.dtype).tiny))


def projection_rows(
    block: Block,
    *,
    src: torch.Tensor,
    dst: torch.Tensor,
    weight: torch.Tensor,
    support: torch.Tensor | None,
    direction: Direction,
    divergence_name: DivergenceName,
    beta: float,
    alpha: float,
    mu: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Projection mapping: divergence between the native and the projected distribution in one vocabulary.

    ``student_to_teacher`` (default): ``q~ = P(q)`` with ``P(q)[:, dst] += q[:, src] * w`` (the table's COO, source =
    student); the comparison runs over the teacher columns the projection reaches (``support``, and the teacher's
    top-k when cached), both distributions renormalised there: ``D(p|S / p(S), q~|S / q~(S))``. Every student token
    reaches the loss through the teacher token its text starts with (Llama's "123" counts towards Qwen's "1").
    ``teacher_to_student``: ``p~ = P(p)`` pushed into the student vocabulary, compared over the student columns it
    reaches; student mass outside those columns is not penalised, which is why it is not the default.

    Metrics: ``teacher_mass_mapped`` (teacher mass that reaches the comparison, before renormalisation).
    """
    t_logp, known = teacher_logp(block)
    s_logp = torch.log_softmax(block.student_logits / block.temperature, -1)
    if direction == "student_to_teacher":
        width = t_logp.shape[-1]
        q_proj = _push(s_logp.exp(), src, dst, weight, width)
        mask = support if known is None else (known if support is None else known & support)
        if mask is not None and mask.dim() == 1:
            mask = mask.expand(t_logp.shape[0], -1)
        t_tilde, t_mass = _renormalised_log(t_logp, mask)
        s_tilde, _ = _renormalised_log(_log_clamped(q_proj), mask)
    else:
        width = s_logp.shape[-1]
        p_proj = _push(t_logp.exp(), src, dst, weight, width)
        mask = (p_proj > 0) if known is not None else support
        if mask is not None and mask.dim() == 1:
            mask = mask.expand(s_logp.shape[0], -1)
        t_tilde, t_mass = _renormalised_log(_log_clamped(p_proj), mask)
        s_tilde, _ = _renormalised_log(s_logp, mask)
    loss = divergence(t_tilde, s_tilde, kind=divergence_name, beta=beta, alpha=alpha, mu=mu)
    return loss, {"teacher_mass_mapped": t_mass.detach()}


def _merged_probs(logp: torch.Tensor, factor: torch.Tensor | None) -> torch.Tensor:
    return (logp if factor is None else logp + factor[:, None]).exp()


def uld_rows(block: Block, *, top_k: int | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ULD mapping: sorted-probability L1 between the (merged) rows; exact, or top-k with its bound.

    With ``top_k`` (or a cached top-k teacher) the metric ``uld_bound`` is the width of the interval holding the
    exact value (see :func:`~xtok_kd.losses.uld.sorted_l1_topk`); it is 0 for the exact form.
    """
    s_logp = torch.log_softmax(block.student_logits / block.temperature, -1)
    q = _merged_probs(s_logp, block.student_factor)
    if block.teacher_logits is not None:
        p = _merged_probs(torch.log_softmax(block.teacher_logits / block.temperature, -1), block.teacher_factor)
        if top_k is None:
            loss = sorted_l1(p, q)
            return loss, {"uld_bound": torch.zeros_like(loss).detach()}
        p_mass = None  # complete rows: their sums are the masses
    else:
        assert block.teacher_topk_logp is not None
        p = _merged_probs(block.teacher_topk_logp, block.teacher_factor)
        p_mass = torch.ones_like(p[:, 0]) if block.teacher_factor is None else block.teacher_factor.exp()
        top_k = min(top_k or p.shape[-1], p.shape[-1])
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
    p = _merged_probs(torch.log_softmax(block.teacher_logits / block.temperature, -1), block.teacher_factor)
    q = _merged_probs(torch.log_softmax(block.student_logits / block.temperature, -1), block.student_factor)
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
