"""The teacher's top-k log-probabilities: computed once here for the cache and for a live teacher alike, and
padded into a collated batch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .format import _ROW_ELEMENTS


def teacher_topk(logits: torch.Tensor, k: int, vocab_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` of ``log_softmax(logits[..., :vocab_size].float(), -1)``: the values a cache stores.

    The trainer calls this same function on a live teacher, so cached and live top-k are bit-identical for the
    same logits. Rows are processed a block at a time (memory ~128 MB of fp32 per block), which does not change
    any row's values.

    Args:
        logits: ``(B, L, W)`` teacher logits, any float dtype; ``W >= vocab_size`` (padding columns are cut).
        k: how many; clamped to the vocabulary.
        vocab_size: the teacher tokenizer's number of ids (default ``W``).

    Returns:
        ``ids`` ``(B, L, k)`` int64 and ``logprobs`` ``(B, L, k)`` float32, most likely first, on ``logits``' device.
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
    k = min(k, vocab)
    batch, length = logits.shape[:2]
    flat = logits.reshape(-1, width)
    ids = torch.empty((flat.shape[0], k), dtype=torch.long, device=logits.device)
    logprobs = torch.empty((flat.shape[0], k), dtype=torch.float32, device=logits.device)
    step = max(1, _ROW_ELEMENTS // vocab)
    with torch.no_grad():
        for a in range(0, flat.shape[0], step):
            values, top = torch.log_softmax(flat[a:a + step, :vocab].float(), dim=-1).topk(k, dim=-1)
            ids[a:a + step], logprobs[a:a + step] = top, values
    return ids.view(batch, length, k), logprobs.view(batch, length, k)



def collate_teacher_topk(examples: Sequence[Mapping[str, Any]], teacher_input_ids: torch.Tensor,
                         teacher_attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad cached rows' top-k to the collated batch, checking the cached teacher ids against the collator's.

    Args:
        examples: ``B`` rows of a :class:`TeacherCache` (in the batch's order).
        teacher_input_ids / teacher_attention_mask: ``(B, Lt)`` from the collator.

    Returns:
        ``ids`` ``(B, Lt, k)`` int64 (empty slots ``-1``) and ``logprobs`` ``(B, Lt, k)`` float32 (empty ``-inf``),
        ready for ``TeacherTopK(ids, logprobs)``.

    Raises:
        ValueError: a row without a cached top-k, or whose cached teacher ids differ from the collator's.
    """
    ids_in, mask = torch.as_tensor(teacher_input_ids), torch.as_tensor(teacher_attention_mask).bool()
    if ids_in.dim() != 2 or ids_in.shape != mask.shape or ids_in.shape[0] != len(examples):
        raise ValueError(f"teacher_input_ids {tuple(ids_in.shape)} and teacher_attention_mask {tuple(mask.shape)} "
                         f"must both be (B, Lt) with B = {len(examples)} examples")
    if not examples or any("teacher_topk_ids" not in ex for ex in examples):
        raise ValueError("every example needs 'teacher_topk_ids' and 'teacher_topk_logprobs' (rows of a "
                         "TeacherCache)")
    k = int(np.shape(examples[0]["teacher_topk_ids"])[-1])
    batch, length = ids_in.shape
    ids = torch.full((batch, length, k), -1, dtype=torch.long)
    logprobs = torch.full((batch, length, k), float("-inf"), dtype=torch.float32)
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
    return ids, logprobs
