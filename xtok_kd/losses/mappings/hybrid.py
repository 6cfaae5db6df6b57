"""``mapping="hybrid"``: GOLD's hybrid, a divergence on exactly matched columns plus sorted L1 on all the others."""

from __future__ import annotations

from typing import Any

import torch

from ..block import Block
from ..divergences import divergence
from ..options import LossOptions
from ..uld import sorted_l1
from .base import MappingMethod, divergence_knobs, merged_probs, scaled

__all__ = ["HybridMapping", "hybrid_rows"]


class HybridMapping(MappingMethod):
    """See :func:`hybrid_rows`. Knobs: ``matched_pairs``, ``hybrid_weights``, ``hybrid_prob_floor``.

    Buffers (built once for the vocabulary widths): the matched columns of each side, their complements, and the
    two weights (default ``(M / Vt, 1 - M / Vt)``, as GOLD).
    """

    name = "hybrid"
    metric_names = ("teacher_mass_matched",)
    accepts_topk = False
    merges = ("none", "observed", "bayesian")

    @classmethod
    def wants_table(cls, options: LossOptions) -> bool:
        return options.matched_pairs is None

    @classmethod
    def problems(cls, options: LossOptions, table: Any) -> list[str]:
        if table is None and options.matched_pairs is None:
            return ["mapping='hybrid' needs table= or matched_pairs=(teacher_ids, student_ids)"]
        return []

    def buffers(self, table: Any, teacher_vocab_size: int | None,
                student_vocab_size: int | None) -> dict[str, torch.Tensor | None]:
        pairs = self.options.matched_pairs
        t_ids, s_ids = pairs if pairs is not None else (table.exact_teacher, table.exact_student)
        tm, sm = torch.as_tensor(t_ids).long(), torch.as_tensor(s_ids).long()
        if tm.shape != sm.shape or tm.dim() != 1:
            raise ValueError(f"matched_pairs must be two 1-d id sequences of equal length, got shapes "
                             f"{tuple(tm.shape)} and {tuple(sm.shape)}")
        self._check_range("teacher", tm, teacher_vocab_size)
        self._check_range("student", sm, student_vocab_size)
        return {"teacher_matched": tm, "student_matched": sm}

    @staticmethod
    def _check_range(side: str, ids: torch.Tensor, width: int | None) -> None:
        if ids.numel() and (int(ids.min()) < 0 or (width is not None and int(ids.max()) >= width)):
            raise ValueError(f"{side} matched ids must lie in [0, {width}), got range [{int(ids.min())}, "
                             f"{int(ids.max())}]")

    def rows(self, block: Block, buffers: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        vt, vs = block.teacher_vocab_size, block.student_logits.shape[-1]
        tm, sm = buffers["teacher_matched"], buffers["student_matched"]
        key = (vt, vs, tm.device, tm.data_ptr(), sm.data_ptr())
        cached = getattr(self, "_columns", None)
        if cached is None or cached[0] != key:  # once per widths and device, not per block
            self._check_range("teacher", tm, vt)
            self._check_range("student", sm, vs)
            t_free = torch.ones(vt, dtype=torch.bool, device=tm.device)
            t_free[tm] = False
            s_free = torch.ones(vs, dtype=torch.bool, device=sm.device)
            s_free[sm] = False
            share = tm.numel() / max(vt, 1)
            w_m, w_u = self.options.hybrid_weights or (share, 1.0 - share)
            cached = (key, t_free.nonzero().flatten(), s_free.nonzero().flatten(), float(w_m), float(w_u))
            self._columns = cached
        _, t_un, s_un, w_m, w_u = cached
        return hybrid_rows(block, teacher_matched=tm, student_matched=sm, teacher_unmatched=t_un,
                           student_unmatched=s_un, matched_weight=w_m, unmatched_weight=w_u,
                           prob_floor=self.options.hybrid_prob_floor, knobs=divergence_knobs(self.options))


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
    knobs: dict[str, Any],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GOLD's hybrid mapping: a divergence on exactly matched columns plus sorted L1 on all other columns.

    ``loss = w_m * D(log max(p[:, T_m], eps), log max(q[:, S_m], eps)) + w_u * ULD(p[:, ~T_m], q[:, ~S_m])`` with
    ``(T_m, S_m)`` the matched pairs, ``p``/``q`` the (merged, unnormalised) rows, ``eps = prob_floor`` and by default
    ``w_m = |T_m| / Vt``, ``w_u = 1 - w_m``, as GOLD does. The matched columns are not renormalised (as in GOLD).

    Metrics: ``teacher_mass_matched`` (share of the teacher row's mass on matched columns).
    """
    if block.teacher_logits is None:
        raise ValueError("mapping='hybrid' needs full teacher logits, not a cached top-k")
    p = merged_probs(torch.log_softmax(scaled(block.teacher_logits, block.temperature), -1), block.teacher_factor)
    q = merged_probs(torch.log_softmax(scaled(block.student_logits, block.temperature), -1), block.student_factor)
    matched = divergence(
        torch.log(p[:, teacher_matched].clamp_min(prob_floor)),
        torch.log(q[:, student_matched].clamp_min(prob_floor)),
        **knobs,
    )
    if teacher_unmatched.numel() and student_unmatched.numel():
        unmatched = sorted_l1(p[:, teacher_unmatched], q[:, student_unmatched])
    else:
        unmatched = torch.zeros_like(matched)
    loss = matched_weight * matched + unmatched_weight * unmatched
    share = (p[:, teacher_matched].sum(-1) / p.sum(-1)).detach()
    return loss, {"teacher_mass_matched": share}
