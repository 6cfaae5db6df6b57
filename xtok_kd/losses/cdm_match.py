"""Contextual top-k matching (CDM): which token of the other side's top-k each top-k token stands for, on device.

Contextual Dynamic Mapping (Chen et al., "Enhancing Cross-Tokenizer Knowledge Distillation with Contextual Dynamical
Mapping", ACL Findings 2025) maps vocabularies row by row: on each aligned row both sides' top-k tokens are taken,
and each top-k token of one side is paired with

1. its exact partner, the token of the other vocabulary with the same canonical bytes, if it has one; else
2. the most similar token AMONG THE OTHER SIDE'S TOP-K AT THAT ROW, by normalised Levenshtein similarity on
   canonical bytes (as characters, :func:`xtok_kd.vocab.fuzzy.token_strings`), ``1 - d / max(len(a), len(b))``,
   if it reaches ``min_score`` (CDM's threshold is an edit
   distance of at most 0.1, so ``min_score=0.9``); else nothing.

Scoring strings inside the training step is out of the question, so the table carries for every token without an
exact partner its ``C`` most similar tokens of the other vocabulary (``VocabAlignment.t2s_neighbours`` and
``t2s_neighbour_scores``, ``C = 8`` by default, best first; ``s2t_*`` for the other direction), and
:func:`match_topk` only tests which of them are in the row's other-side top-k: sort that top-k, ``searchsorted``
every candidate into it, keep the best-scoring one present. Everything is gathered and compared on the tensors'
device; memory is ``O(R * k * C)``, no loop over rows.

Approximation: a partner is found only among the ``C`` precomputed candidates. A brute force over the row's top-k
can find a token with a higher score, or one at all, that is not among them: one of many equally close variants of
a long token, or a neighbour the pruned search of :mod:`xtok_kd.vocab.fuzzy` missed. The matcher then returns a
worse candidate or none. Scores are the table's, rounded up to float16 (:func:`xtok_kd.vocab.table.half_up`): a
token exactly at ``min_score`` passes, and one less than ``2**-11`` below it (possible only for tokens of about 200
characters or more) passes too. ``tests/test_cdm_match.py`` measures the agreement with a brute force on rows of
k = 32 built from real tokenizer pairs (Qwen2.5 <-> Mistral, Qwen2.5 <-> Llama 3.2, both directions, rows rich in
near-duplicates): on source slots without an exact partner the partner ids agree on 0.9997 to 1.0 of them at
``min_score=0.9`` (CDM's setting; the one miss, ``" reprezent"`` -> ``" represent"``, is a neighbour the pruned
search missed), on 0.91 to 0.97 at 0.7 and on 0.81 to 0.85 at 0.5: at a low threshold a token has many tokens
above it, and a row holding one ranked below the table's eighth candidate (the test's rows do so on purpose) gets
a worse one or none.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..directions import Direction, direction_code

__all__ = ["EXACT", "CANDIDATE", "NONE", "exact_partner_vector", "match_topk", "matching_tensors"]

NONE, EXACT, CANDIDATE = 0, 1, 2  # values of the ``kind`` tensor


def match_topk(
    src_ids: torch.Tensor,
    dst_ids: torch.Tensor,
    *,
    exact: torch.Tensor,
    cand_ids: torch.Tensor,
    cand_scores: torch.Tensor,
    min_score: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The partner of every source top-k token in the other vocabulary, exact or among the row's other top-k.

    Args:
        src_ids: ``(R, k)`` integer source-vocabulary ids of each row's top-k, -1 for an empty slot.
        dst_ids: ``(R, k2)`` integer ids of the other vocabulary, the same rows' top-k, -1 for an empty slot.
        exact: ``(V_src,)`` integer, the exact partner of each source id, -1 for none
            (:func:`exact_partner_vector`).
        cand_ids: ``(V_src, C)`` integer candidate partners of each source id, best first, -1 padded
            (``VocabAlignment.t2s_neighbours``).
        cand_scores: ``(V_src, C)`` float similarities of those candidates in [0, 1]
            (``VocabAlignment.t2s_neighbour_scores``).
        min_score: the least similarity a candidate needs, in (0, 1] (CDM: 0.9); compared at the precision of
            ``cand_scores`` (rounded to its dtype, as a tensor-scalar comparison does).

    Returns:
        ``(partner, kind)``: ``(R, k)`` int64 other-vocabulary ids (-1 for none) and ``(R, k)`` int8
        :data:`NONE` (0), :data:`EXACT` (1) or :data:`CANDIDATE` (2). An empty slot gets -1 / 0. A source id with
        an exact partner gets it whether or not it is in the row's ``dst_ids`` (the caller gathers the other
        side's logit there). Otherwise the partner is the candidate with the highest score ``>= min_score`` that
        is present in the row's ``dst_ids``, the earlier candidate on ties, or -1.

    Source ids must be below ``V_src``; they are not range-checked (that would synchronise the device). Every
    tensor must be on the same device; the table's tensors move with ``VocabAlignment.to(device)``.
    """
    _check_inputs(src_ids, dst_ids, exact, cand_ids, cand_scores, min_score)
    src, dst = src_ids.long(), dst_ids.long()
    rows, k = src.shape
    k2, c = dst.shape[1], cand_ids.shape[1]
    filled = src >= 0
    safe = src.clamp(min=0)
    exact_partner = exact[safe].long()  # (R, k)
    is_exact = filled & (exact_partner >= 0)

    found = torch.zeros_like(filled)
    cand_partner = torch.full_like(src, -1)
    if c and k2 and rows * k:
        cand = cand_ids[safe].long()  # (R, k, C)
        score = cand_scores[safe]  # compared in its own dtype: min_score rounds to that precision, as scores did
        usable = (cand >= 0) & (score >= min_score) & (filled & ~is_exact).unsqueeze(-1)
        # membership of each candidate in its row's dst top-k: binary search in the sorted row
        ordered = dst.sort(dim=1).values  # (R, k2), empty slots (-1) first
        flat = cand.reshape(rows, k * c)
        at = torch.searchsorted(ordered, flat).clamp_(max=k2 - 1)
        usable &= (ordered.gather(1, at) == flat).view(rows, k, c)
        best = torch.where(usable, score.float(), -1.0).argmax(dim=-1, keepdim=True)  # the first maximum on ties
        found = usable.any(dim=-1)
        cand_partner = cand.gather(-1, best).squeeze(-1)

    partner = torch.where(is_exact, exact_partner, torch.where(found, cand_partner, torch.full_like(src, -1)))
    kind = is_exact.to(torch.int8) * EXACT + found.to(torch.int8) * CANDIDATE  # never both: found needs ~is_exact
    return partner, kind


def exact_partner_vector(table: Any, direction: Direction) -> torch.Tensor:
    """``(V_src,)`` int64 exact partner of every source id of ``table`` (a ``VocabAlignment``), -1 for none.

    Built from the table's exact pairs (``exact_teacher`` / ``exact_student``), on the table's device. Where a
    source id has several exact partners (SentencePiece spells a space both as ``▁`` and as the byte piece
    ``<0x20>``, and ``A`` both as ``A`` and ``<0x41>``), the one the table's projection pins (``*_first``) is
    taken: a regular piece before a byte-fallback piece, then the lowest id. The lowest id alone would pick the
    byte pieces, which a SentencePiece model almost never predicts. Should the projection not pin one of them
    (a table assembled by hand), the lowest id is taken.

    Args:
        table: a :class:`~xtok_kd.vocab.VocabAlignment`.
        direction: ``"teacher_to_student"`` (source = teacher ids) or ``"student_to_teacher"``.
    """
    d = _direction(direction)
    src, dst = (table.exact_teacher, table.exact_student) if d == "t2s" else (table.exact_student, table.exact_teacher)
    src, dst = src.long(), dst.long()
    first = getattr(table, f"{d}_first").long()
    size = first.shape[0]
    lowest = torch.full((size,), torch.iinfo(torch.int64).max, dtype=torch.int64, device=first.device)
    lowest.scatter_reduce_(0, src, dst, reduce="amin", include_self=True)
    out = torch.where(lowest == torch.iinfo(torch.int64).max, torch.full_like(lowest, -1), lowest)
    pinned = torch.zeros(size, dtype=torch.bool, device=first.device)
    pinned[src[first[src] == dst]] = True  # source ids whose projection is one of their exact partners
    return torch.where(pinned, first, out)


def matching_tensors(table: Any, direction: Direction) -> dict[str, torch.Tensor]:
    """The table tensors :func:`match_topk` takes for ``direction``: ``exact``, ``cand_ids`` and ``cand_scores``.

    ``match_topk(src_ids, dst_ids, **matching_tensors(table, "teacher_to_student"), min_score=0.9)``.
    """
    d = _direction(direction)
    return {"exact": exact_partner_vector(table, direction), "cand_ids": getattr(table, f"{d}_neighbours"),
            "cand_scores": getattr(table, f"{d}_neighbour_scores")}


# ---------------------------------------------------------------------- checks
def _direction(direction: str) -> str:
    return direction_code(direction)


def _is_integer(t: torch.Tensor) -> bool:
    return not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)


def _check_inputs(src_ids: Any, dst_ids: Any, exact: Any, cand_ids: Any, cand_scores: Any, min_score: Any) -> None:
    named = {"src_ids": src_ids, "dst_ids": dst_ids, "exact": exact, "cand_ids": cand_ids, "cand_scores": cand_scores}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, ndim in (("src_ids", 2), ("dst_ids", 2), ("exact", 1), ("cand_ids", 2), ("cand_scores", 2)):
        if named[name].ndim != ndim:
            raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(named[name].shape)}")
    for name in ("src_ids", "dst_ids", "exact", "cand_ids"):
        if not _is_integer(named[name]):
            raise TypeError(f"{name} must hold integer ids, got dtype {named[name].dtype}")
    if not cand_scores.dtype.is_floating_point:
        raise TypeError(f"cand_scores must be a float tensor, got dtype {cand_scores.dtype}")
    if dst_ids.shape[0] != src_ids.shape[0]:
        raise ValueError(f"src_ids has {src_ids.shape[0]} rows but dst_ids has {dst_ids.shape[0]}; pass the same rows")
    if cand_ids.shape != cand_scores.shape or cand_ids.shape[0] != exact.shape[0]:
        raise ValueError(f"exact {tuple(exact.shape)}, cand_ids {tuple(cand_ids.shape)} and cand_scores "
                         f"{tuple(cand_scores.shape)} must be (V_src,), (V_src, C) and (V_src, C)")
    devices = {name: t.device for name, t in named.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all tensors must be on one device, got {devices}; move the table with "
                         "VocabAlignment.to(device)")
    if (isinstance(min_score, bool) or not isinstance(min_score, (int, float)) or math.isnan(min_score)
            or not 0 < min_score <= 1):
        raise ValueError(f"min_score must be a number in (0, 1], got {min_score!r} (CDM uses 0.9)")
