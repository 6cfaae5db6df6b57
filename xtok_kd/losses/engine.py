"""The chunked engine: aligned rows in blocks, gradients computed inside the forward, memory bounded by a block.

The loss of a chunk depends only on its own logits rows: the aligned row, plus, with a merge strategy, the rows
that predict the chunk's other tokens. Chunks are disjoint token ranges, so every logits row belongs to at most one
chunk. The engine walks the chunks in blocks of about ``block_rows`` rows; for each block it gathers the rows
(casting to fp32, or fp64 for fp64 logits), runs the mapping under autograd, takes the gradient with respect to the
block's student rows at once and frees the block's vocabulary-sized buffers before the next block. It keeps one
``(R, Vs)`` gradient per used student row (``R <= B * Ls``), the size of the rows the loss reads. In the backward
each row's gradient is scaled by the upstream gradient of its chunk's loss, which makes any reduction exact.

Peak memory is therefore ``O(block_rows * (Vt + Vs))`` plus the stored row gradients, independent of batch and
length, never ``batch x length x vocabulary x vocabulary``. A chunk longer than ``block_rows`` tokens forms a block
alone. :func:`chunked_kd` is the one entry point: it plans the blocks, checks the tokens the plan reads, and runs
any mapping (an object with ``rows(block, buffers)``, ``metric_names``, ``needs_loglik`` and ``plan_merge``; see
:mod:`xtok_kd.losses.mappings.base`) without knowing which one it is. The teacher is a constant: no gradient flows to teacher logits (they may live on another device: their rows
are gathered there and moved). Double backward is not supported.

Values: ``-inf`` logits are ruled-out tokens and never make a loss NaN; a chunk whose divergence is genuinely ``+inf``
keeps that value and gets no gradient. NaN in a block's loss or metrics can only come from a NaN or ``+inf`` logit
or a row of ``-inf``: only then are the block's rows searched, and the first bad one is named.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .block import Block
from .options import Merge
from .types import TeacherTopK

__all__ = ["Plan", "build_plan", "chunked_kd"]

#: Token probabilities entering a chunk merge are floored at this value (as GOLD does), so a log never reaches -inf.
MERGE_PROB_FLOOR = 1e-8


@dataclass
class Plan:
    """Flat row indices (``sample * length + row``) of every chunk's rows, and the block boundaries.

    ``*_base`` ``(K,)``: the row whose distribution the mapping compares (the aligned row; with ``bayesian`` merge the
    row predicting the chunk's last token). ``*_scalar_row``/``_token``/``_chunk`` ``(M,)``: the rows predicting the
    chunk's other tokens, the actual token ids, the owning chunk (sorted). ``blocks``: per block, ``[start, end)`` of
    its chunks, then of its student scalar rows, then of its teacher scalar rows. ``*_base_token`` ``(K,)``: the
    token the base row predicts (the chunk's first token with ``observed`` merge), or None when not asked for.
    """

    num_chunks: int
    student_base: torch.Tensor
    teacher_base: torch.Tensor
    student_scalar_row: torch.Tensor
    student_scalar_token: torch.Tensor
    student_scalar_chunk: torch.Tensor
    teacher_scalar_row: torch.Tensor
    teacher_scalar_token: torch.Tensor
    teacher_scalar_chunk: torch.Tensor
    blocks: list[tuple[int, int, int, int, int, int]]
    student_base_token: torch.Tensor | None = None
    teacher_base_token: torch.Tensor | None = None


def _side(
    sample: torch.Tensor, first: torch.Tensor, count: torch.Tensor, length: int, ids: torch.Tensor | None, merge: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    base = first + count - 2 if merge == "bayesian" else first - 1
    base_flat = sample * length + base
    empty = base_flat.new_zeros(0)
    if merge == "none":
        return base_flat, empty, empty, empty
    n_scalar = count - 1
    chunk = torch.repeat_interleave(torch.arange(first.shape[0], device=first.device), n_scalar)
    start = torch.cumsum(n_scalar, 0) - n_scalar
    offset = torch.arange(chunk.shape[0], device=first.device) - start[chunk]
    token = first[chunk] + offset + (1 if merge == "observed" else 0)
    if ids is None:
        raise ValueError(f"merge={merge!r} needs the input ids of both sides")
    token_id = ids[sample[chunk], token].long()
    return base_flat, sample[chunk] * length + token - 1, token_id, chunk


def build_plan(
    rows: Any,
    *,
    merge: Merge,
    student_length: int,
    teacher_length: int,
    block_rows: int,
    student_input_ids: torch.Tensor | None = None,
    teacher_input_ids: torch.Tensor | None = None,
    base_tokens: bool = False,
) -> Plan:
    """A :class:`Plan` from :class:`~xtok_kd.sequence.AlignedRows` (vectorised; no loop over chunks).

    ``base_tokens``: also read the token each base row predicts (needs the input ids; ``merge`` none/observed)."""
    s_base, s_row, s_tok, s_chunk = _side(rows.sample, rows.student_first, rows.student_count, student_length,
                                          student_input_ids, merge)
    t_base, t_row, t_tok, t_chunk = _side(rows.sample, rows.teacher_first, rows.teacher_count, teacher_length,
                                          teacher_input_ids, merge)
    k = int(rows.sample.shape[0])
    if merge == "none":
        cost = torch.ones(k, dtype=torch.long)
    else:
        cost = torch.maximum(rows.student_count, rows.teacher_count).long().cpu()
    before = torch.cumsum(cost, 0) - cost
    block_id = before // block_rows
    opens = torch.ones(k, dtype=torch.bool)
    opens[1:] = block_id[1:] != block_id[:-1]
    starts = torch.nonzero(opens).flatten().tolist()  # one int per block, not per chunk
    edges = torch.tensor(starts + [k], dtype=torch.long)
    s_edges = torch.searchsorted(s_chunk.cpu(), edges).tolist()  # where each block's scalar rows start
    t_edges = torch.searchsorted(t_chunk.cpu(), edges).tolist()
    blocks = [(starts[i], (starts + [k])[i + 1], s_edges[i], s_edges[i + 1], t_edges[i], t_edges[i + 1])
              for i in range(len(starts))]
    plan = Plan(k, s_base, t_base, s_row, s_tok, s_chunk, t_row, t_tok, t_chunk, blocks)
    if base_tokens:
        if student_input_ids is None or teacher_input_ids is None or merge == "bayesian":
            raise ValueError("the chunk likelihoods need both sides' input ids and merge 'none' or 'observed'")
        plan.student_base_token = student_input_ids[rows.sample, rows.student_first].long()
        plan.teacher_base_token = teacher_input_ids[rows.sample, rows.teacher_first].long()
    return plan


def _check_rows(x: torch.Tensor, flat_rows: torch.Tensor, length: int, side: str) -> None:
    """Raise ``ValueError`` naming the first row of ``x`` that holds NaN or +inf, or is -inf in every column."""
    bad_value = torch.isnan(x) | (x == float("inf"))
    bad = bad_value.any(-1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        col = int(bad_value[i].nonzero()[0])
        flat = int(flat_rows[i])
        raise ValueError(
            f"{side} logits contain NaN or inf at batch {flat // length}, position {flat % length} ({x[i, col].item()} "
            f"in column {col}); -inf (a ruled-out token) is accepted, NaN and +inf are not: check the model's forward "
            "pass (overflow in fp16?), or mask that position out of the alignment"
        )
    dead = (x == float("-inf")).all(-1)
    if bool(dead.any()):
        flat = int(flat_rows[int(dead.nonzero()[0])])
        raise ValueError(
            f"{side} logits at batch {flat // length}, position {flat % length} are -inf in every vocabulary column: "
            "that row rules out every token, so it is no distribution; leave at least one token possible, or mask "
            "that position out of the alignment"
        )


def _take(flat: torch.Tensor, rows: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``flat[rows]`` gathered where ``flat`` lives (the teacher may sit on another device), moved to ``device``."""
    # Advanced indexing, not index_select: on CPU, index_select(0, .) over wide fp32 rows was measured 20x slower
    # (2048 x 151,936 logits, 32 rows: 180 ms against 8 ms, torch 2.13).
    if rows.device != flat.device:
        return flat[rows.to(flat.device)].to(device)
    return flat[rows]


def _token_logp(rows: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    scaled = rows if temperature == 1.0 else rows / temperature
    lp = scaled.gather(1, tokens[:, None]).squeeze(1) - torch.logsumexp(scaled, -1)
    return lp.clamp_min(math.log(MERGE_PROB_FLOOR))


@dataclass
class _Spec:
    plan: Plan
    block_fn: Callable[[Block], tuple[torch.Tensor, dict[str, torch.Tensor]]]
    metric_names: tuple[str, ...]
    student_width: int
    teacher_width: int
    student_length: int
    teacher_length: int
    temperature: float
    needs_loglik: bool = False
    teacher_next_logp: torch.Tensor | None = None  # (B * Lt,) a top-k teacher's log-prob of its own next token


def _logliks(spec: _Spec, block: Block, t_rows: torch.Tensor, c0: int, c1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each chunk's log-likelihood on both sides: the base row's log-probability of the chunk's first token plus the
    merge factor (the chunk's later tokens); a top-k teacher reads its own next-token log-probabilities."""
    plan, temp = spec.plan, spec.temperature
    if plan.student_base_token is None or plan.teacher_base_token is None:
        raise ValueError("chunk likelihoods need a plan with base tokens")
    s_ll = _token_logp(block.student_logits, plan.student_base_token[c0:c1], temp)
    if block.teacher_logits is not None:
        t_ll = _token_logp(block.teacher_logits, plan.teacher_base_token[c0:c1], temp)
    elif spec.teacher_next_logp is not None:
        t_ll = _take(spec.teacher_next_logp, t_rows, s_ll.device).to(s_ll.dtype).clamp_min(math.log(MERGE_PROB_FLOOR))
    else:
        raise ValueError("this mapping needs the teacher's log-probability of its own next tokens: pass a TeacherTopK "
                         "with next_token_logprobs (a teacher cache of format 2 has them), or the full teacher logits")
    if block.student_factor is not None:
        s_ll = s_ll + block.student_factor
    if block.teacher_factor is not None:
        t_ll = t_ll + block.teacher_factor
    return s_ll, t_ll.detach()


class _ChunkedKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, student_logits: torch.Tensor, teacher_logits: Any, topk_ids: Any, topk_logp: Any,
                spec: _Spec) -> tuple[torch.Tensor, torch.Tensor]:
        plan = spec.plan
        needs_grad = bool(ctx.needs_input_grad[0])
        cd = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
        s_flat = student_logits.reshape(-1, student_logits.shape[-1])
        t_flat = teacher_logits.reshape(-1, teacher_logits.shape[-1]) if teacher_logits is not None else None
        tk_ids = topk_ids.reshape(-1, topk_ids.shape[-1]) if topk_ids is not None else None
        tk_logp = topk_logp.reshape(-1, topk_logp.shape[-1]) if topk_logp is not None else None
        vs, vt, temp = spec.student_width, spec.teacher_width, spec.temperature
        dev = student_logits.device
        k = plan.num_chunks
        losses = torch.zeros(k, dtype=cd, device=student_logits.device)
        metrics = torch.zeros(k, len(spec.metric_names), dtype=cd, device=student_logits.device)
        grad_rows = torch.cat([plan.student_base, plan.student_scalar_row])
        grad_chunk = torch.cat([torch.arange(k, device=grad_rows.device), plan.student_scalar_chunk])
        compact = student_logits.new_empty(grad_rows.shape[0], vs) if needs_grad else None  # every row is written
        for c0, c1, m0, m1, n0, n1 in plan.blocks:
            with torch.enable_grad():
                s_rows = plan.student_base[c0:c1]
                s_base = s_flat[:, :vs][s_rows].to(cd)
                s_base.requires_grad_(needs_grad)
                s_factor = t_factor = s_scalar = None
                if m1 > m0:
                    sc_rows = plan.student_scalar_row[m0:m1]
                    s_scalar = s_flat[:, :vs][sc_rows].to(cd)
                    s_scalar.requires_grad_(needs_grad)
                    lp = _token_logp(s_scalar, plan.student_scalar_token[m0:m1], temp)
                    s_factor = lp.new_zeros(c1 - c0).index_add(0, plan.student_scalar_chunk[m0:m1] - c0, lp)
                t_rows = plan.teacher_base[c0:c1]
                t_sc_rows = plan.teacher_scalar_row[n0:n1]
                t_sc_tok = plan.teacher_scalar_token[n0:n1]
                t_base = ids_b = logp_b = None
                if t_flat is not None:
                    t_base = _take(t_flat[:, :vt], t_rows, dev).to(cd)  # one contiguous copy of the rows
                    if n1 > n0:
                        t_scalar = _take(t_flat[:, :vt], t_sc_rows, dev).to(cd)
                        lp_t = _token_logp(t_scalar, t_sc_tok, temp)
                else:
                    ids_b, logp_b = _take(tk_ids, t_rows, dev), _take(tk_logp, t_rows, dev).to(cd)
                    if n1 > n0 and spec.teacher_next_logp is not None:  # exact: the teacher's own next-token log-probs
                        lp_t = _take(spec.teacher_next_logp, t_sc_rows, dev).to(cd).clamp_min(math.log(MERGE_PROB_FLOOR))
                    elif n1 > n0:
                        hit = _take(tk_ids, t_sc_rows, dev) == t_sc_tok[:, None]
                        lp_t = _take(tk_logp, t_sc_rows, dev).to(cd).masked_fill(~hit, float("-inf")).amax(-1)
                        lp_t = lp_t.clamp_min(math.log(MERGE_PROB_FLOOR))
                if n1 > n0:
                    t_factor = lp_t.new_zeros(c1 - c0).index_add(0, plan.teacher_scalar_chunk[n0:n1] - c0, lp_t)
                block = Block(s_base, t_base, ids_b, logp_b, vt, s_factor, t_factor, temp)
                if spec.needs_loglik:
                    block.student_loglik, block.teacher_loglik = _logliks(spec, block, t_rows, c0, c1)
                loss_b, met_b = spec.block_fn(block)
                # -inf logits are ruled-out tokens: a divergence may be +inf (genuinely), never NaN. NaN in the block's
                # loss or metrics comes from a NaN / +inf logit or a row of -inf only: find it and say where.
                total = loss_b.sum() + sum(m.sum() for m in met_b.values())
                finite = bool(torch.isfinite(total))  # one host sync per block in the usual, all-finite case
                if not finite and bool(torch.isnan(total)):
                    _check_rows(s_flat[s_rows][:, :vs], s_rows, spec.student_length, "student")
                    if m1 > m0:
                        _check_rows(s_flat[sc_rows][:, :vs], sc_rows, spec.student_length, "student")
                    if t_flat is not None:
                        _check_rows(_take(t_flat, t_rows, dev)[:, :vt], t_rows, spec.teacher_length, "teacher")
                        if n1 > n0:
                            _check_rows(_take(t_flat, t_sc_rows, dev)[:, :vt], t_sc_rows, spec.teacher_length,
                                        "teacher")
                    raise FloatingPointError(f"the loss of chunks {c0}..{c1 - 1} is NaN although their logits are "
                                             "valid; please report this with the inputs")
                if needs_grad:
                    inputs = [s_base] if s_scalar is None else [s_base, s_scalar]
                    grads = list(torch.autograd.grad(loss_b.sum(), inputs, allow_unused=True))
                    infinite = None if finite else torch.isinf(loss_b)
                    if infinite is not None and bool(infinite.any()):  # an infinite chunk gets no gradient
                        if grads[0] is not None:
                            grads[0] = grads[0].masked_fill(infinite[:, None], 0.0)
                        if s_scalar is not None and grads[1] is not None:
                            own = infinite[plan.student_scalar_chunk[m0:m1] - c0]
                            grads[1] = grads[1].masked_fill(own[:, None], 0.0)
            losses[c0:c1] = loss_b.detach()
            for j, name in enumerate(spec.metric_names):
                metrics[c0:c1, j] = met_b[name].detach()
            if compact is not None:
                compact[c0:c1] = 0.0 if grads[0] is None else grads[0]
                if s_scalar is not None:
                    compact[k + m0:k + m1] = 0.0 if grads[1] is None else grads[1]
            del block, s_base, s_scalar, t_base, loss_b, met_b
        ctx.compact = compact
        ctx.save_for_backward(grad_rows, grad_chunk)
        ctx.logits_shape = student_logits.shape
        ctx.mark_non_differentiable(metrics)
        return losses, metrics

    @staticmethod
    def backward(ctx: Any, grad_losses: torch.Tensor, grad_metrics: Any) -> tuple[Any, ...]:
        grad_rows, grad_chunk = ctx.saved_tensors
        compact = ctx.compact
        shape = ctx.logits_shape
        out = compact.new_zeros(math.prod(shape[:-1]), shape[-1])
        scale = grad_losses.to(compact.dtype)[grad_chunk]
        target = out[:, : compact.shape[1]]
        for r0 in range(0, compact.shape[0], 256):  # scaled copy in row blocks: no (R, V) temporary
            r1 = min(r0 + 256, compact.shape[0])
            target.index_copy_(0, grad_rows[r0:r1], compact[r0:r1] * scale[r0:r1, None])
        return out.view(shape), None, None, None, None


def _where(flat: int, length: int) -> str:
    return f"batch {flat // length}, position {flat % length}"


def _check_tokens(name: str, tokens: torch.Tensor, rows: torch.Tensor, length: int, vocab: int,
                  shift: int = 1) -> None:
    """Tokens the plan reads (the ids predicted by ``rows``) must lie in ``[0, vocab)``."""
    bad = (tokens < 0) | (tokens >= vocab)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        flat = int(rows[i]) + shift  # the row predicting the token is the position before it
        raise ValueError(f"{name} holds token id {int(tokens[i])} at {_where(flat, length)}, outside the "
                         f"vocabulary [0, {vocab}); merge and chunk likelihoods read the ids of every token inside a "
                         "chunk: pass the input ids the model read (not labels with -100)")


def chunked_kd(
    student_logits: torch.Tensor,
    teacher: torch.Tensor | TeacherTopK,
    rows: Any,
    *,
    mapping: Any,
    buffers: dict[str, Any],
    merge: Merge,
    block_rows: int,
    student_width: int,
    teacher_width: int,
    temperature: float,
    student_input_ids: torch.Tensor | None = None,
    teacher_input_ids: torch.Tensor | None = None,
    check_teacher_rows: Callable[[torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-chunk losses ``(K,)`` and metrics ``(K, len(mapping.metric_names))``, computed block by block.

    Args:
        student_logits: ``(B, Ls, >= student_width)``; differentiable.
        teacher: ``(B, Lt, >= teacher_width)`` logits, or a :class:`~xtok_kd.losses.TeacherTopK` ``(B, Lt, k)``
            (empty slots already at ``-inf``).
        rows: :class:`~xtok_kd.sequence.AlignedRows` of the chunks in the loss.
        mapping: a :class:`~xtok_kd.losses.mappings.base.MappingMethod`; ``buffers`` its tensors on this device.
        merge: chunk merge (the mapping's ``plan_merge`` overrides it); ``block_rows``: aligned rows per block.
        student_width / teacher_width: vocabulary widths; wider logits are sliced to them before any softmax.
        student_input_ids / teacher_input_ids: ``(B, >= L)`` ids; needed by a merge and by chunk likelihoods.
        check_teacher_rows: called with the flat teacher rows the plan reads (validates a top-k teacher there).
    """
    merge = mapping.plan_merge or merge
    topk = teacher if isinstance(teacher, TeacherTopK) else None
    t_ref = topk.ids if topk is not None else teacher
    dev = student_logits.device
    plan = build_plan(
        rows, merge=merge, student_length=student_logits.shape[1], teacher_length=t_ref.shape[1],
        block_rows=block_rows,
        student_input_ids=None if student_input_ids is None else student_input_ids.to(dev),
        teacher_input_ids=None if teacher_input_ids is None else teacher_input_ids.to(dev),
        base_tokens=bool(mapping.needs_loglik),
    )
    if merge != "none":
        _check_tokens("student_input_ids", plan.student_scalar_token, plan.student_scalar_row,
                      student_logits.shape[1], student_width)
        _check_tokens("teacher_input_ids", plan.teacher_scalar_token, plan.teacher_scalar_row, t_ref.shape[1],
                      teacher_width)
    if mapping.needs_loglik:
        _check_tokens("student_input_ids", plan.student_base_token, plan.student_base, student_logits.shape[1],
                      student_width)
        _check_tokens("teacher_input_ids", plan.teacher_base_token, plan.teacher_base, t_ref.shape[1], teacher_width)
    if check_teacher_rows is not None:
        check_teacher_rows(torch.cat([plan.teacher_base, plan.teacher_scalar_row]))
    next_logp = None
    if topk is not None and topk.next_token_logprobs is not None:
        next_logp = topk.next_token_logprobs.reshape(-1)
    spec = _Spec(plan, lambda block: mapping.rows(block, buffers), tuple(mapping.metric_names), student_width,
                 teacher_width, student_logits.shape[1], t_ref.shape[1], temperature,
                 needs_loglik=bool(mapping.needs_loglik), teacher_next_logp=next_logp)
    ids, logp = (topk.ids, topk.logprobs) if topk is not None else (None, None)
    return _ChunkedKD.apply(student_logits, None if topk is not None else teacher, ids, logp, spec)
