"""``mapping="cdm"``: contextual dynamic mapping (CDM, Chen et al., ACL Findings 2025), row by row on the device.

On each aligned row take both sides' top-``k`` tokens (``top_k``, default 32). Each teacher top-k token is paired
with a student token: its exact canonical-byte partner if it has one, else the most similar token AMONG THE
STUDENT'S TOP-K AT THAT ROW whose normalised edit distance is at most ``cdm_max_distance`` (default 0.1, CDM's), else
nothing; each student top-k token likewise with a teacher token. The pairs of both directions are pooled (a pair
found from both sides counts once) and the divergence compares the teacher's and the student's log-probabilities at
them, each renormalised over the pairs: ``D(p[pairs] / p(pairs), q[pairs] / q(pairs))``. Unpaired slots are left
out; the metrics report how much of each side's top-k mass found a partner.

With one tokenizer on both sides every token is its own exact partner, so the pairs are the union of the two top-k
sets and CDM is token-level KD restricted to that union. No string is scored in the training step: the table
carries each token's most similar candidates (:mod:`xtok_kd.losses.cdm_match` states the approximation and how well
it agrees with a brute-force search). A token paired from both sides with different partners appears in two pairs,
as in CDM. A cached teacher (:class:`~xtok_kd.losses.TeacherTopK`) works: its top-k is the teacher's; a pair whose
teacher token is outside the cached top-k has no teacher probability and is left out.
"""

from __future__ import annotations

from typing import Any

import torch

from ..block import Block
from ..cdm_match import match_topk, matching_tensors
from ..divergences import LOG_FLOOR, divergence
from ..options import LossOptions
from .base import MappingMethod, divergence_knobs, one_tokenizer, scaled, teacher_top

__all__ = ["CdmMapping", "DEFAULT_TOP_K"]

DEFAULT_TOP_K = 32


def _renormalised(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``values - logsumexp(values[valid])`` on valid slots, :data:`LOG_FLOOR` elsewhere (never NaN)."""
    lse = torch.logsumexp(values.masked_fill(~valid, float("-inf")), -1, keepdim=True)
    lse = lse.masked_fill(~torch.isfinite(lse), 0.0)
    return torch.where(valid, values - lse, values.new_tensor(LOG_FLOOR))


class CdmMapping(MappingMethod):
    """See the module docstring. Knobs: ``top_k``, ``cdm_max_distance``, ``divergence`` and its knobs.

    Metrics: ``cdm_teacher_matched`` / ``cdm_student_matched``: share of each side's top-k probability mass whose
    token found a partner.
    """

    name = "cdm"
    metric_names = ("cdm_teacher_matched", "cdm_student_matched")
    needs_table = True

    @classmethod
    def problems(cls, options: LossOptions, table: Any) -> list[str]:
        found = super().problems(options, table)
        if table is not None and not hasattr(table, "t2s_neighbours"):
            found.append("mapping='cdm' needs a table with neighbour candidates (an xtok_kd VocabAlignment of "
                         "format 2: `xtok-kd align TEACHER STUDENT -o PATH`)")
        return found

    def buffers(self, table: Any, teacher_vocab_size: int | None,
                student_vocab_size: int | None) -> dict[str, torch.Tensor | None]:
        out = {}
        same = one_tokenizer(table)
        for d, direction in (("t2s", "teacher_to_student"), ("s2t", "student_to_teacher")):
            for key, value in matching_tensors(table, direction).items():
                out[f"cdm_{d}_{key}"] = value
            if same:  # one tokenizer: every id is its own partner (not a byte piece's regular twin)
                out[f"cdm_{d}_exact"] = torch.arange(out[f"cdm_{d}_exact"].shape[0])
        return out

    def rows(self, block: Block, buffers: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        k = self.options.top_k or DEFAULT_TOP_K
        min_score = 1.0 - float(self.options.cdm_max_distance)
        s_lp = torch.log_softmax(scaled(block.student_logits, block.temperature), -1)
        vs = s_lp.shape[-1]
        s_top = s_lp.detach().topk(min(k, vs), -1)
        t_lp, t_top_vals, t_top_ids = teacher_top(block, k)
        t2s = {key[8:]: v for key, v in buffers.items() if key.startswith("cdm_t2s_")}
        s2t = {key[8:]: v for key, v in buffers.items() if key.startswith("cdm_s2t_")}
        s_partner, _ = match_topk(t_top_ids, s_top.indices, **t2s, min_score=min_score)
        t_partner, _ = match_topk(s_top.indices, t_top_ids, **s2t, min_score=min_score)
        pair_t = torch.cat([t_top_ids, t_partner], 1)  # (c, k_t + k_s) teacher side of each pair
        pair_s = torch.cat([s_partner, s_top.indices], 1)
        valid = (pair_t >= 0) & (pair_s >= 0)
        key = torch.where(valid, pair_t * vs + pair_s, torch.full_like(pair_t, -1))
        key_sorted, order = key.sort(-1)
        repeat = torch.zeros_like(valid)
        repeat[:, 1:] = key_sorted[:, 1:] == key_sorted[:, :-1]
        valid &= ~torch.zeros_like(valid).scatter_(1, order, repeat)  # keep each pair once
        t_safe, s_safe = pair_t.clamp_min(0), pair_s.clamp_min(0)
        if block.teacher_logits is not None:
            t_vals = t_lp.gather(1, t_safe)
        else:  # the teacher's log-probability is known only on its cached top-k
            hit = block.teacher_topk_ids[:, None, :] == t_safe[:, :, None]
            t_vals = torch.where(hit, block.teacher_topk_logp[:, None, :], float("-inf")).amax(-1)
            valid &= hit.any(-1)
        valid &= t_vals > float("-inf")
        s_vals = s_lp.gather(1, s_safe)
        loss = divergence(_renormalised(t_vals, valid), _renormalised(s_vals, valid),
                          **divergence_knobs(self.options))
        nothing = ~valid.any(-1)
        if bool(nothing.any()):
            loss = loss.masked_fill(nothing, 0.0)
        with torch.no_grad():
            t_p, s_p = t_top_vals.exp(), s_top.values.exp()
            t_share = (t_p * (s_partner >= 0)).sum(-1) / t_p.sum(-1).clamp_min(1e-30)
            s_share = (s_p * (t_partner >= 0)).sum(-1) / s_p.sum(-1).clamp_min(1e-30)
        return loss, {"cdm_teacher_matched": t_share, "cdm_student_matched": s_share}
