"""``mapping="uld"``: sorted-probability L1 between the (merged) rows; no vocabulary mapping at all."""

from __future__ import annotations

from typing import Any

import torch

from ..block import Block
from ..uld import sorted_l1, sorted_l1_topk
from .base import MappingMethod, merged_probs, scaled

__all__ = ["UldMapping", "uld_rows"]


class UldMapping(MappingMethod):
    """See :func:`uld_rows`. Knob: ``top_k``."""

    name = "uld"
    metric_names = ("uld_bound",)
    merges = ("none", "observed", "bayesian")

    def rows(self, block: Block, buffers: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return uld_rows(block, top_k=self.options.top_k)


def uld_rows(block: Block, *, top_k: int | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ULD mapping: sorted-probability L1 between the (merged) rows; exact, or top-k with its bound.

    With ``top_k`` (or a cached top-k teacher) the metric ``uld_bound`` is the width of the interval holding the
    exact value (see :func:`~xtok_kd.losses.uld.sorted_l1_topk`); it is 0 for the exact form. A cached top-k's empty
    slots are left out: each row compares as many ranks as it has known ids.
    """
    s_logp = torch.log_softmax(scaled(block.student_logits, block.temperature), -1)
    q = merged_probs(s_logp, block.student_factor)
    if block.teacher_logits is not None:
        p = merged_probs(torch.log_softmax(scaled(block.teacher_logits, block.temperature), -1), block.teacher_factor)
        if top_k is None:
            loss = sorted_l1(p, q)
            return loss, {"uld_bound": torch.zeros_like(loss).detach()}
        p_mass = None  # complete rows: their sums are the masses
    else:
        if block.teacher_topk_logp is None or block.teacher_topk_ids is None:
            raise ValueError("a block needs teacher logits or a teacher top-k")
        p = merged_probs(block.teacher_topk_logp, block.teacher_factor)  # empty slots hold -inf: probability 0
        p_mass = torch.ones_like(p[:, 0]) if block.teacher_factor is None else block.teacher_factor.exp()
        known = (block.teacher_topk_ids >= 0).sum(-1)
        top_k = min(top_k or p.shape[-1], p.shape[-1])
        loss, bound = sorted_l1_topk(p, q, k=top_k, teacher_mass=p_mass, teacher_known=known)
        return loss, {"uld_bound": bound}
    loss, bound = sorted_l1_topk(p, q, k=top_k, teacher_mass=p_mass)
    return loss, {"uld_bound": bound}


