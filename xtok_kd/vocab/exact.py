"""Exact matches: teacher and student vocabulary entries with the same canonical bytes."""

from __future__ import annotations

import numpy as np

from ..tokenizer import TokenizerView

__all__ = ["exact_pairs"]


def exact_pairs(teacher: TokenizerView, student: TokenizerView) -> tuple[np.ndarray, np.ndarray]:
    """All pairs of NON-special ids whose canonical bytes are equal.

    Compares :meth:`TokenizerView.token_bytes`, never raw vocabulary strings, so a byte-level ``Ġthe`` matches a
    SentencePiece ``▁the`` and a ``<0x41>`` byte piece matches ``A``. A vocabulary may spell the same bytes twice
    (SentencePiece ``▁`` and ``<0x20>``); every such pair is kept (many-to-many). Empty entries never match.

    Returns:
        ``(teacher_ids, student_ids)``: two ``(E,)`` int64 arrays, sorted by teacher id then student id.
    """
    student_special = student.special_ids
    by_bytes: dict[bytes, list[int]] = {}
    for sid, piece in enumerate(student.all_token_bytes()):
        if piece and sid not in student_special:
            by_bytes.setdefault(piece, []).append(sid)
    teacher_special = teacher.special_ids
    t_out: list[int] = []
    s_out: list[int] = []
    for tid, piece in enumerate(teacher.all_token_bytes()):
        if tid in teacher_special:
            continue
        hits = by_bytes.get(piece)
        if hits:
            t_out.extend([tid] * len(hits))
            s_out.extend(hits)
    return np.asarray(t_out, dtype=np.int64), np.asarray(s_out, dtype=np.int64)


def is_byte_piece(view: TokenizerView, token_id: int) -> bool:
    """Whether ``token_id`` is a SentencePiece byte-fallback piece such as ``<0x20>``."""
    piece = view.backend.id_to_token(int(token_id)) or ""
    return len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")


def exact_partner(
    source_ids: np.ndarray, target_ids: np.ndarray, *, source_size: int, target: TokenizerView
) -> np.ndarray:
    """One exact partner per source id: ``(source_size,)`` int64, -1 where none.

    Where a source entry matches several target entries (SentencePiece ``▁`` and ``<0x20>``), a regular piece is
    preferred over a byte-fallback piece, then the lowest id.
    """
    out = np.full(source_size, -1, dtype=np.int64)
    order = np.lexsort((target_ids, source_ids))
    for s, t in zip(source_ids[order].tolist(), target_ids[order].tolist()):
        old = int(out[s])
        if old < 0 or (is_byte_piece(target, old) and not is_byte_piece(target, t)):
            out[s] = t
    return out
