"""``mapping="sinkhorn"``: entropic optimal transport between both sides' top-k on every aligned row.

Each aligned row's teacher distribution is cut to its top-``k`` (``top_k``, default 64) plus one tail atom holding
the rest of its mass, and likewise the student's, so both marginals sum to 1 and nothing is dropped. The loss is the
entropic transport objective between them (or, with ``unbiased=True``, the Sinkhorn divergence
``W(P,Q) - W(P,P)/2 - W(Q,Q)/2``, 0 for identical inputs), solved for all rows of a block at once by the batched
solver of :mod:`xtok_kd.losses.transport` (which states the gradient convention and the defaults): exp-domain
iterations with sparse lexical kernels where a row's kernel stays in range, POT's batched log-domain solver
(``ot.batch``) for the other rows, as the reference in the tests and as ``solver="pot"``.

Costs (``cost=``):

* ``lexical`` (default, needs only the table): 0 for an exact canonical-byte pair, ``1 - similarity`` for a table
  neighbour or a projection's first piece (similarity of a prefix: its share of the token's bytes), 1 otherwise;
* ``embedding`` (Wasserstein KD, Lv et al. 2024): ``1 - cosine`` of the teacher's output embeddings
  (``teacher_embeddings=``, the lm_head weight ``(>= Vt, d)``) of the teacher token and of the student token's
  projection (first piece) into the teacher vocabulary.

With ``sequence_weight > 0`` a sequence-level term (MultiLevelOT, Cui et al. 2025) is added: entropic transport
between the positions of one sequence on each side, cost = L1 between their sorted top-k probability vectors,
uniform marginals over the positions that predict aligned content (:mod:`xtok_kd.losses.sequence_ot`). It needs no
token alignment, so it still compares where chunks are sparse; each chunk of a sequence carries ``sequence_weight``
times its sequence's value (so ``mean`` over chunks and gradient accumulation stay exact).

Student atoms (``sinkhorn_support``): ``"top_k"`` (default) is the student's top-k, as the method is stated;
``"union"`` adds the student tokens the teacher's top-k map to (exact pair, else the projection's first piece), so
that the transport has an atom for every token the teacher wants. Measured with ``benchmarks/quality.py`` (60 steps,
3 seeds): neither helps much, top-k +0.066 / +0.061 bits per byte over CE-only (Mistral / Llama 3.2 students),
union +0.034 / +0.039, against +0.42 / +0.79 for projection + fkl. A transport value moves a probability by at most
its cost, so a token the student gives 1e-5 gets a gradient of that order (forward KL's is the teacher's
probability itself); ``sequence_weight`` helps more (+0.19 / +0.14).

Tail atoms cost 0 to each other and 1 to every token. The ``k x k`` costs are built on the device by gathers (and one
batched matmul for embeddings): no Python per row, no host round trip. Rows whose Sinkhorn did not converge within
``sinkhorn_max_iter`` are counted (metric ``sinkhorn_unconverged``, a count per call) and warned about once per call.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ..block import Block
from ..cdm_match import exact_partner_vector
from ..options import LossOptions
from ..transport import (
    embedding_cost,
    embedding_self_cost,
    entropic_ot,
    lexical_cost,
    self_cost,
    sinkhorn_divergence,
)
from ..types import TeacherTopK
from .base import MappingMethod, one_tokenizer, scaled, teacher_top

__all__ = ["DEFAULT_TOP_K", "SinkhornMapping"]

DEFAULT_TOP_K = 64


def _with_tail(top_logp: torch.Tensor) -> torch.Tensor:
    """``(c, k)`` top log-probabilities -> ``(c, k + 1)`` probabilities with the tail mass appended."""
    p = top_logp.exp()
    return torch.cat([p, (1.0 - p.sum(-1, keepdim=True)).clamp_min(0.0)], -1)


def _mapped(t_ids: torch.Tensor, buffers: dict[str, Any]) -> torch.Tensor:
    """``(c, k)`` the student token each teacher top-k token maps to: its exact pair, else its projection's first
    piece, else -1."""
    safe = t_ids.clamp_min(0)
    out = buffers["sinkhorn_exact_t2s"][safe]
    first = buffers["sinkhorn_t2s_first"]
    if first is not None:
        out = torch.where(out >= 0, out, first[safe])
    return out.masked_fill(t_ids < 0, -1)


def _union(ids: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
    """``(c, k + k2)``: ``ids`` then ``extra``, every repeated (or negative) id after its first place set to -1."""
    both = torch.cat([ids, extra], 1)
    ordered, order = both.sort(dim=-1, stable=True)
    repeat = torch.zeros_like(ordered, dtype=torch.bool)
    repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    repeat = torch.zeros_like(repeat).scatter_(1, order, repeat)
    return both.masked_fill(repeat | (both < 0), -1)


class SinkhornMapping(MappingMethod):
    """See the module docstring. Knobs: ``top_k``, ``cost``, ``epsilon``, ``sinkhorn_max_iter``, ``sinkhorn_tol``,
    ``unbiased``, ``teacher_embeddings``, ``sequence_weight``, ``sinkhorn_support``.

    Metrics: ``sinkhorn_cost`` (mean transport cost ``<T, M>`` of the plans, in cost units) and
    ``sinkhorn_unconverged`` (how many rows did not converge, summed over the call).
    """

    name = "sinkhorn"
    metric_names = ("sinkhorn_cost", "sinkhorn_unconverged")
    needs_table = True
    transient = ("sinkhorn_embeddings",)

    @classmethod
    def problems(cls, options: LossOptions, table: Any) -> list[str]:
        found = super().problems(options, table)
        emb = options.teacher_embeddings
        if options.cost == "embedding":
            if not isinstance(emb, torch.Tensor) or emb.dim() != 2 or not emb.is_floating_point():
                got = f"a {emb.dtype} tensor of shape {tuple(emb.shape)}" if isinstance(emb, torch.Tensor) else (
                    type(emb).__name__)
                found.append(f"cost='embedding' needs teacher_embeddings=, the teacher's output embeddings as a "
                             f"(Vt, d) float tensor (model.get_output_embeddings().weight), got {got}")
            elif table is not None and emb.shape[0] < int(table.teacher_vocab_size):
                found.append(f"teacher_embeddings has {emb.shape[0]} rows, fewer than the teacher vocabulary of "
                             f"{int(table.teacher_vocab_size)} ids: pass the teacher's lm_head weight")
        elif emb is not None:
            found.append("teacher_embeddings is read by cost='embedding' only (got cost='lexical')")
        if table is not None and options.top_k is not None:
            width = min(int(table.teacher_vocab_size), int(table.student_vocab_size))
            if options.top_k > width:
                found.append(f"top_k={options.top_k} exceeds the smaller vocabulary ({width} ids)")
        return found

    def buffers(self, table: Any, teacher_vocab_size: int | None,
                student_vocab_size: int | None) -> dict[str, torch.Tensor | None]:
        same = one_tokenizer(table)
        exact = torch.arange(int(table.teacher_vocab_size)) if same else exact_partner_vector(
            table, "teacher_to_student")
        out: dict[str, torch.Tensor | None] = {"sinkhorn_exact_t2s": exact}
        for name in ("t2s_first", "s2t_first", "t2s_neighbours", "t2s_neighbour_scores", "s2t_neighbours",
                     "s2t_neighbour_scores", "teacher_token_lengths", "student_token_lengths"):
            value = getattr(table, name, None)
            out[f"sinkhorn_{name}"] = None if value is None else torch.as_tensor(value)
        if same:  # one tokenizer: every id is its own first piece (not a byte piece's regular twin)
            out["sinkhorn_t2s_first"] = torch.arange(int(table.teacher_vocab_size))
            out["sinkhorn_s2t_first"] = torch.arange(int(table.student_vocab_size))
        if out["sinkhorn_teacher_token_lengths"] is None:  # a table without byte lengths: no first-piece costs
            out["sinkhorn_t2s_first"] = out["sinkhorn_s2t_first"] = None
        emb = self.options.teacher_embeddings
        out["sinkhorn_embeddings"] = None if emb is None else emb.detach()[: int(table.teacher_vocab_size)]
        return out

    def summarise(self, per_chunk: torch.Tensor) -> torch.Tensor:
        out = per_chunk.mean(0)
        unconverged = per_chunk[:, 1].sum()
        out[1] = unconverged
        n = int(unconverged)
        if n:
            o = self.options
            warnings.warn(f"mapping='sinkhorn': {n} of {per_chunk.shape[0]} aligned rows did not converge within "
                          f"sinkhorn_max_iter={o.sinkhorn_max_iter} (tol={o.sinkhorn_tol}, epsilon={o.epsilon}); "
                          "their loss uses the last iterate. Raise sinkhorn_max_iter or epsilon", stacklevel=3)
        return out

    def sequence_losses(self, student_logits: torch.Tensor, teacher: Any, alignment: Any, *, student_width: int,
                        teacher_width: int, temperature: float) -> tuple[torch.Tensor, dict[str, float]] | None:
        o = self.options
        if not o.sequence_weight:
            return None
        from ..sequence_ot import sequence_transport

        masks = []
        for chunk in (alignment.student_chunk, alignment.teacher_chunk):
            chunk = torch.as_tensor(chunk, device=student_logits.device).long()
            keep = torch.as_tensor(alignment.chunk_loss_mask, device=chunk.device)
            content = (chunk >= 0) & keep[chunk.clamp_min(0)]
            mask = torch.zeros_like(content)
            mask[:, :-1] = content[:, 1:]  # a row takes part when the token it predicts is aligned content
            masks.append(mask)
        if not isinstance(teacher, TeacherTopK):
            teacher = teacher[..., :teacher_width]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # counted below
            seq = sequence_transport(student_logits[..., :student_width], teacher, masks[0], masks[1],
                                     top_k=o.top_k or DEFAULT_TOP_K, temperature=temperature, epsilon=o.epsilon,
                                     max_iter=o.sinkhorn_max_iter, tol=o.sinkhorn_tol, unbiased=o.unbiased)
        bad = int((~seq.converged).sum())
        if bad:
            warnings.warn(f"mapping='sinkhorn': the sequence-level transport of {bad} sequence(s) did not converge "
                          f"within sinkhorn_max_iter={o.sinkhorn_max_iter}; raise it or epsilon", stacklevel=3)
        return o.sequence_weight * seq.value, {"sequence_ot": float(seq.value.detach().mean()) if seq.value.numel()
                                               else 0.0, "sequence_unconverged": float(bad)}

    def rows(self, block: Block, buffers: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        o = self.options
        k = o.top_k or DEFAULT_TOP_K
        s_lp = torch.log_softmax(scaled(block.student_logits, block.temperature), -1)
        s_ids = s_lp.detach().topk(min(k, s_lp.shape[-1]), -1).indices
        cached = block.teacher_topk_ids
        if cached is not None and o.top_k is not None and o.top_k > cached.shape[-1]:
            raise ValueError(f"top_k={o.top_k} but the cached teacher holds only {cached.shape[-1]} tokens per "
                             f"position; pass top_k <= {cached.shape[-1]} or cache a larger top-k")
        _, t_top, t_ids = teacher_top(block, k)
        a = _with_tail(t_top)
        if o.sinkhorn_support == "union":  # the student tokens the teacher's top-k map to join the student's atoms
            s_ids = _union(s_ids, _mapped(t_ids, buffers))
            s_ids = s_ids[:, (s_ids >= 0).any(0)]  # drop the slots no row uses (all duplicates, e.g. one tokenizer)
        b = _with_tail(s_lp.gather(1, s_ids.clamp_min(0)).masked_fill(s_ids < 0, float("-inf")))
        knobs = {"epsilon": o.epsilon, "max_iter": o.sinkhorn_max_iter, "tol": o.sinkhorn_tol}
        if o.cost == "embedding":
            emb = buffers["sinkhorn_embeddings"]
            first = buffers["sinkhorn_s2t_first"]
            s_proj = first[s_ids.clamp_min(0)].masked_fill(s_ids < 0, -1)
            cost_ab = embedding_cost(t_ids, s_proj, emb)
            selves = (lambda: (embedding_self_cost(t_ids, emb), embedding_self_cost(s_proj, emb)))
        else:
            cost_ab = lexical_cost(
                t_ids, s_ids, exact_t2s=buffers["sinkhorn_exact_t2s"], t2s_first=buffers["sinkhorn_t2s_first"],
                s2t_first=buffers["sinkhorn_s2t_first"], t2s_neighbours=buffers["sinkhorn_t2s_neighbours"],
                t2s_neighbour_scores=buffers["sinkhorn_t2s_neighbour_scores"],
                s2t_neighbours=buffers["sinkhorn_s2t_neighbours"],
                s2t_neighbour_scores=buffers["sinkhorn_s2t_neighbour_scores"],
                teacher_lengths=buffers["sinkhorn_teacher_token_lengths"],
                student_lengths=buffers["sinkhorn_student_token_lengths"], dtype=a.dtype)
            selves = (lambda: (self_cost(t_ids, dtype=a.dtype), self_cost(s_ids, dtype=a.dtype)))
        if o.unbiased:
            cost_aa, cost_bb = selves()
            res = sinkhorn_divergence(a, b, cost_ab, cost_aa, cost_bb, **knobs)
        else:
            res = entropic_ot(a, b, cost_ab, **knobs)
        unconverged = (~res.converged).to(res.value.dtype)
        return res.value, {"sinkhorn_cost": res.transport_cost.detach(), "sinkhorn_unconverged": unconverged}
