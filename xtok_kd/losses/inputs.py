"""Checks of what the loss is given: logits widths, pairing fingerprints, input ids, a cached teacher's top-k.

Each check raises ``ValueError`` / ``TypeError`` naming the bad value, where it is (batch index, position) and the
fix. ``owner`` is the :class:`~xtok_kd.losses.CrossTokenizerKDLoss` (its vocabulary sizes, names, fingerprints).
"""

from __future__ import annotations

import math
from collections.abc import Mapping as MappingABC
from typing import Any

import torch

from .types import TeacherTopK

__all__ = ["check_fingerprints", "check_ids", "check_topk", "check_width", "max_padding", "unpack"]

#: Logits may be wider than the vocabulary by up to ``max(MIN_PADDING, V // PADDING_FRACTION)`` columns.
MIN_PADDING, PADDING_FRACTION = 1024, 32


def max_padding(vocab_size: int) -> int:
    """Most padding columns accepted beyond a vocabulary of ``vocab_size`` ids: ``max(1024, vocab_size // 32)``.

    Models pad the embedding to a multiple of 64 to 1024 rows (tensor cores, tensor-parallel shards; Qwen2.5: 151,665
    ids in 151,936 or 152,064 rows, Phi-2: 50,295 in 51,200) or to a round number a few percent above (DeepSeek-LLM:
    100,015 in 102,400). Another model's vocabulary differs by far more (Llama 3's 128,256 against GPT-2's 50,257).
    """
    return max(MIN_PADDING, int(vocab_size) // PADDING_FRACTION)


def _where(flat: int, length: int) -> str:
    return f"batch {flat // length}, position {flat % length}"


def check_width(owner: Any, name: str, logits_width: int, vocab: int | None) -> int:
    """The vocabulary width to slice ``name``'s logits to; ``ValueError`` unless the logits fit it (docstring)."""
    if vocab is None:
        return logits_width
    limit = max_padding(vocab)
    if vocab <= logits_width <= vocab + limit:
        return vocab
    other = "student" if name == "teacher" else "teacher"
    other_vocab = getattr(owner, f"{other}_vocab_size")
    swapped = other_vocab is not None and other_vocab <= logits_width <= other_vocab + max_padding(other_vocab)
    hint = (f" They fit the {other} vocabulary ({other_vocab} ids): are student and teacher logits swapped? "
            "The call is loss(student_logits, teacher_logits, alignment).") if swapped else ""
    if logits_width < vocab:
        raise ValueError(f"{name} logits have {logits_width} columns but the {name} vocabulary has {vocab} ids "
                         f"(this loss: {owner._pair()}); pass the full logits (a model's padded width is fine: "
                         f"extra columns are sliced off).{hint}")
    fix = ("rebuild or load the table for the pair of models you run (xtok_kd.vocab.get_or_build(teacher, "
           "student), or CrossTokenizerKDLoss(teacher=..., student=...))"
           if owner.teacher_fingerprint is not None or owner.teacher_name is not None
           else f"pass the right {name}_vocab_size")
    raise ValueError(
        f"{name} logits have {logits_width} columns, {logits_width - vocab} more than the {name} vocabulary of "
        f"{vocab} ids (this loss: {owner._pair()}); a model pads its embedding by at most max(1024, V // 32) = "
        f"{limit} columns, so these logits come from a model with another vocabulary.{hint} Fix: {fix}; if the "
        f"width really is right, slice the logits to their first {vocab} columns yourowner."
    )



def check_fingerprints(owner: Any, alignment: Any) -> None:
    problems = []
    for side in ("teacher", "student"):
        got = getattr(alignment, f"{side}_fingerprint", None)
        want = getattr(owner, f"{side}_fingerprint")
        if got is None or want is None or str(got) == want:
            continue
        other = "student" if side == "teacher" else "teacher"
        swap = " (that is the table's " + other + ": teacher and student swapped?)" if str(got) == getattr(
            owner, f"{other}_fingerprint") else ""
        problems.append(f"the alignment's {side} tokenizer has fingerprint {got}{swap}, the table's {side} "
                        f"{getattr(owner, f'{side}_name')!r} has {want}")
    if problems:
        raise ValueError(
            "the alignment was made with other tokenizers than this loss's vocabulary table "
            f"({owner._pair()}): " + "; ".join(problems) + ". Fix: rebuild or load the table for this pair "
            "(xtok_kd.vocab.get_or_build(teacher, student), or CrossTokenizerKDLoss(teacher=..., student=...)), "
            "or make the batch with the collator of this table's tokenizers"
        )



def unpack(alignment: Any, wants_ids: bool, student_input_ids: Any, teacher_input_ids: Any) -> tuple[Any, Any, Any]:
    """The Alignment (and, for a merge, input ids) out of what was passed: an Alignment or the collator's dict."""
    if isinstance(alignment, MappingABC):
        if "alignment" not in alignment:
            raise TypeError(f"alignment is a dict with keys {sorted(map(str, alignment))} but no 'alignment'; pass "
                            "the xtok_kd.sequence.Alignment (batch['alignment'] of CrossTokenizerCollator)")
        batch = alignment
        alignment = batch["alignment"]
        if wants_ids:
            student_input_ids = batch.get("student_input_ids") if student_input_ids is None else student_input_ids
            teacher_input_ids = batch.get("teacher_input_ids") if teacher_input_ids is None else teacher_input_ids
    needed = ("rows", "batch_size", "teacher_chunk", "student_chunk")
    if not all(hasattr(alignment, a) for a in needed):
        raise TypeError(f"alignment must be an xtok_kd.sequence.Alignment (or the collator's batch dict holding "
                        f"one), got {type(alignment).__name__}; pass batch['alignment'] of "
                        "CrossTokenizerCollator, or xtok_kd.sequence.align_spans(...)")
    return alignment, student_input_ids, teacher_input_ids



def check_ids(name: str, ids: Any, batch: int, length: int) -> torch.Tensor | None:
    if ids is None:
        return None
    if not isinstance(ids, torch.Tensor):
        try:
            ids = torch.as_tensor(ids)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"{name} must be a (B, L) tensor of token ids, got {type(ids).__name__}") from err
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
    if ids.dim() != 2 or ids.shape[0] != batch or ids.shape[1] < length:
        raise ValueError(f"{name} has shape {tuple(ids.shape)}, but the alignment needs ({batch}, >= {length}): "
                         f"the ids the model read, one row per sample (batch['{name}'] of the collator)")
    return ids



def check_topk(owner: Any, topk: TeacherTopK, rows: torch.Tensor, length: int, vocab: int) -> None:
    """Validate the top-k rows the loss reads (see :class:`TeacherTopK`)."""
    k = topk.ids.shape[-1]
    rows = rows.to(topk.ids.device)
    ids = topk.ids.reshape(-1, k).index_select(0, rows)
    logp = topk.logprobs.reshape(-1, k).index_select(0, rows)
    empty = ids < 0

    def where(i: int) -> str:
        return _where(int(rows[i]), length)

    over = ids >= vocab
    if bool(over.any()):
        i, j = (int(x) for x in over.nonzero()[0])
        raise ValueError(f"TeacherTopK id {int(ids[i, j])} at {where(i)}, slot {j} is outside the teacher "
                         f"vocabulary of {vocab} ids (this loss: {owner._pair()}): the cache was made with another "
                         "teacher tokenizer, or use the table of this teacher. Negative ids are empty slots")
    lp = logp.masked_fill(empty, float("-inf"))
    bad = torch.isnan(lp) | (lp > 1e-3)
    if bool(bad.any()):
        i, j = (int(x) for x in bad.nonzero()[0])
        raise ValueError(f"TeacherTopK logprobs hold {lp[i, j].item()} at {where(i)}, slot {j}; they must be "
                         "log-probabilities (<= 0, from log_softmax before topk; -inf for a ruled-out token), "
                         "not NaN, +inf or raw logits")
    mass = torch.logsumexp(lp.float(), -1)
    over_one = mass > math.log1p(1e-2)
    if bool(over_one.any()):
        i = int(over_one.nonzero()[0])
        raise ValueError(f"TeacherTopK probabilities at {where(i)} sum to {mass[i].exp().item():.4g} > 1; pass "
                         "log-probabilities of the full softmax (log_softmax before topk), not raw logits")
    if k > 1:
        srt = torch.sort(ids.masked_fill(empty, -1), -1).values
        dup = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
        if bool(dup.any()):
            i, j = (int(x) for x in dup.nonzero()[0])
            raise ValueError(f"TeacherTopK ids repeat id {int(srt[i, j + 1])} at {where(i)}; each id may appear "
                             "once per position (mark unused slots with -1)")

    nxt = topk.next_token_logprobs
    if nxt is not None:
        lp = nxt.reshape(-1).index_select(0, rows.to(nxt.device))
        bad = torch.isnan(lp) | (lp > 1e-3)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ValueError(f"TeacherTopK next_token_logprobs hold {lp[i].item()} at {where(i)}; they must be the "
                             "teacher's log-probabilities of its own next tokens (<= 0, -inf allowed), not NaN, +inf "
                             "or raw logits")
