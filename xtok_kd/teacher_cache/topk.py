"""The teacher's top-k log-probabilities and the log-probability of its own next tokens: computed once here for the
cache and for a live teacher alike, and padded into a collated batch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, overload

import numpy as np
import torch

from .format import _ROW_ELEMENTS


def _next_ids(input_ids: Any, attention_mask: Any, shape: tuple[int, int], vocab: int,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B*L,)`` ids to gather (``input_ids[:, i + 1]``; 0 where unread) and ``(B*L,)`` whether position i is read:
    not the last column, and (with a mask) both i and i + 1 attended."""
    ids = torch.as_tensor(input_ids)
    if ids.shape != shape or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be a (B, L) = {shape} integer tensor (the teacher ids the logits were "
                         f"computed from), got {ids.dtype} {tuple(ids.shape)}")
    ids = ids.to(device=device, dtype=torch.long)
    read = torch.zeros(shape, dtype=torch.bool, device=device)
    read[:, :-1] = True
    if attention_mask is not None:
        mask = torch.as_tensor(attention_mask)
        if mask.shape != shape:
            raise ValueError(f"attention_mask must be (B, L) = {shape} like input_ids, got {tuple(mask.shape)}")
        mask = mask.to(device=device).bool()
        read[:, :-1] &= mask[:, :-1] & mask[:, 1:]
    nxt = torch.zeros(shape, dtype=torch.long, device=device)
    nxt[:, :-1] = ids[:, 1:]
    bad = read & ((nxt < 0) | (nxt >= vocab))
    if bool(bad.any()):
        b, i = (int(v) for v in torch.nonzero(bad)[0])
        raise ValueError(f"input_ids[{b}, {i + 1}] = {int(nxt[b, i])} is not a teacher id in [0, {vocab}): the ids are "
                         "not the teacher tokenizer's")
    return nxt.where(read, 0).reshape(-1), read.reshape(-1)


@overload
def teacher_topk(logits: torch.Tensor, k: int, vocab_size: int | None = None, *, input_ids: None = None,
                 attention_mask: Any = None) -> tuple[torch.Tensor, torch.Tensor]: ...
@overload
def teacher_topk(logits: torch.Tensor, k: int, vocab_size: int | None = None, *, input_ids: torch.Tensor,
                 attention_mask: Any = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...
def teacher_topk(logits: torch.Tensor, k: int, vocab_size: int | None = None, *, input_ids: Any = None,
                 attention_mask: Any = None) -> tuple[torch.Tensor, ...]:
    """Top-``k`` of ``log_softmax(logits[..., :vocab_size].float(), -1)``: the values a cache stores; with
    ``input_ids``, also the log-probability of each next input token.

    With ``p = log_softmax(logits[..., :vocab_size].float(), -1)``::

        ids, logprobs = p.topk(k, -1)
        next_token_logprobs[b, i] = p[b, i, input_ids[b, i + 1]]   (0 where not read, see below)

    The trainer calls this same function on a live teacher, so cached and live values are bit-identical for the
    same logits (a next token inside the top-k has exactly its top-k value). Rows are processed a block at a time
    (memory ~128 MB of fp32 per block), which does not change any row's values.

    Args:
        logits: ``(B, L, W)`` teacher logits, any float dtype; ``W >= vocab_size`` (padding columns are cut).
        k: how many; clamped to the vocabulary.
        vocab_size: the teacher tokenizer's number of ids (default ``W``).
        input_ids: ``(B, L)`` the teacher ids ``logits`` were computed from; None: no next-token log-probs.
        attention_mask: ``(B, L)`` with ``input_ids``; position ``i`` is read only when ``i`` and ``i + 1`` are both
            attended (None: every position but the last).

    Returns:
        ``ids`` ``(B, L, k)`` int64 and ``logprobs`` ``(B, L, k)`` float32, most likely first; with ``input_ids``
        also ``next_token_logprobs`` ``(B, L)`` float32, 0 at the last position and wherever the mask stops (never
        read). All on ``logits``' device; ``TeacherTopK(*teacher_topk(...))`` builds the loss input.

    Raises:
        ValueError: a bad shape or ``k``; ``vocab_size`` above ``W``; a read next id outside ``[0, vocab_size)``.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or not logits.is_floating_point():
        raise ValueError(f"logits must be a (B, L, W) float tensor, got {getattr(logits, 'shape', type(logits))}")
    width = logits.shape[-1]
    vocab = width if vocab_size is None else int(vocab_size)
    if not 1 <= vocab <= width:
        raise ValueError(f"teacher logits have {width} columns but vocab_size is {vocab_size}: the tokenizer is not "
                         "the model's; pass the teacher model's own tokenizer")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if input_ids is None and attention_mask is not None:
        raise ValueError("attention_mask is only read with input_ids (for the next-token log-probabilities)")
    k = min(k, vocab)
    batch, length = logits.shape[:2]
    flat = logits.reshape(-1, width)
    ids = torch.empty((flat.shape[0], k), dtype=torch.long, device=logits.device)
    logprobs = torch.empty((flat.shape[0], k), dtype=torch.float32, device=logits.device)
    if input_ids is not None:
        nxt, read = _next_ids(input_ids, attention_mask, (batch, length), vocab, logits.device)
        next_lp = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    step = max(1, _ROW_ELEMENTS // vocab)
    with torch.no_grad():
        for a in range(0, flat.shape[0], step):
            full = torch.log_softmax(flat[a:a + step, :vocab].float(), dim=-1)
            logprobs[a:a + step], ids[a:a + step] = full.topk(k, dim=-1)
            if input_ids is not None:
                next_lp[a:a + step] = full.gather(1, nxt[a:a + step, None]).squeeze(1)
    out = (ids.view(batch, length, k), logprobs.view(batch, length, k))
    if input_ids is None:
        return out
    return (*out, next_lp.where(read, 0.0).view(batch, length))



def collate_teacher_topk(examples: Sequence[Mapping[str, Any]], teacher_input_ids: torch.Tensor,
                         teacher_attention_mask: torch.Tensor,
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Pad cached rows' top-k and next-token log-probabilities to the collated batch, checking the cached teacher
    ids against the collator's.

    Args:
        examples: ``B`` rows of a :class:`TeacherCache` (in the batch's order).
        teacher_input_ids / teacher_attention_mask: ``(B, Lt)`` from the collator.

    Returns:
        ``ids`` ``(B, Lt, k)`` int64 (empty slots ``-1``), ``logprobs`` ``(B, Lt, k)`` float32 (empty ``-inf``) and
        ``next_token_logprobs`` ``(B, Lt)`` float32 (0 at padding; None when the rows carry none), ready for
        ``TeacherTopK(*collate_teacher_topk(...))``: the values :func:`teacher_topk` gives the live teacher on this
        batch with its ``input_ids`` and ``attention_mask``.

    Raises:
        ValueError: a row without a cached top-k, or whose cached teacher ids differ from the collator's; rows of
            which only some carry next-token log-probabilities.
    """
    ids_in, mask = torch.as_tensor(teacher_input_ids), torch.as_tensor(teacher_attention_mask).bool()
    if ids_in.dim() != 2 or ids_in.shape != mask.shape or ids_in.shape[0] != len(examples):
        raise ValueError(f"teacher_input_ids {tuple(ids_in.shape)} and teacher_attention_mask {tuple(mask.shape)} "
                         f"must both be (B, Lt) with B = {len(examples)} examples")
    if not examples or any("teacher_topk_ids" not in ex for ex in examples):
        raise ValueError("every example needs 'teacher_topk_ids' and 'teacher_topk_logprobs' (rows of a "
                         "TeacherCache)")
    has_next = ["teacher_next_token_logprobs" in ex for ex in examples]
    if any(has_next) and not all(has_next):
        raise ValueError(f"examples {[b for b, h in enumerate(has_next) if not h][:5]} of the batch have no "
                         "'teacher_next_token_logprobs' but others do: mix no rows of different teacher caches")
    k = int(np.shape(examples[0]["teacher_topk_ids"])[-1])
    batch, length = ids_in.shape
    ids = torch.full((batch, length, k), -1, dtype=torch.long)
    logprobs = torch.full((batch, length, k), float("-inf"), dtype=torch.float32)
    next_lp = torch.zeros((batch, length), dtype=torch.float32) if has_next[0] else None
    for b, ex in enumerate(examples):
        want = ids_in[b][mask[b]].cpu()
        cached = torch.as_tensor(np.asarray(ex["teacher_input_ids_cached"]), dtype=torch.long)
        top, lps = torch.as_tensor(ex["teacher_topk_ids"]), torch.as_tensor(ex["teacher_topk_logprobs"])
        if cached.shape != want.shape or not torch.equal(cached, want):
            where = (f"lengths differ: cached {cached.shape[0]}, collated {want.shape[0]}"
                     if cached.shape != want.shape else "same length, other ids")
            raise ValueError(f"example {b} of the batch: its cached teacher ids differ from the collator's ({where}). "
                             "The cache was likely made with another max_length, teacher tokenizer or loss_on; use the "
                             "collator settings in the cache's manifest, or rebuild the cache")
        if top.shape != (want.shape[0], k) or lps.shape != top.shape:
            raise ValueError(f"example {b} of the batch: top-k arrays {tuple(top.shape)} / {tuple(lps.shape)}, "
                             f"expected ({want.shape[0]}, {k})")
        pos = torch.nonzero(mask[b].cpu(), as_tuple=True)[0]
        ids[b, pos], logprobs[b, pos] = top.long(), lps.float()
        if next_lp is not None:
            nlp = torch.as_tensor(ex["teacher_next_token_logprobs"])
            if nlp.shape != want.shape:
                raise ValueError(f"example {b} of the batch: next-token log-probabilities {tuple(nlp.shape)}, "
                                 f"expected ({want.shape[0]},)")
            nlp = nlp.float().clone()
            # read only where the next position is attended too: the live teacher_topk gives 0 elsewhere
            follows = torch.zeros(len(pos), dtype=torch.bool)
            follows[:-1] = (pos[1:] == pos[:-1] + 1)
            next_lp[b, pos] = nlp.where(follows, 0.0)
    return ids, logprobs, next_lp
