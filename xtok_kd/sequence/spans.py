"""Byte-span alignment: linear-time, vectorised, batched.

Given the byte spans of the same text under two tokenizers, the chunk boundaries are the byte positions where
both sides have a token boundary. Because spans are monotone, every step below is a linear pass or a
``searchsorted`` in numpy; there is no Python loop over tokens or samples.
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np

from .alignment import Alignment

__all__ = ["align_spans", "pad_spans"]

SpansLike = Union[np.ndarray, Sequence[np.ndarray]]


def pad_spans(spans: SpansLike, *, length: int | None = None, name: str = "spans") -> np.ndarray:
    """Stack per-sample ``(n_b, 2)`` spans into ``(B, L, 2)``; padding gets empty spans at the sample's end."""
    if isinstance(spans, np.ndarray) and spans.ndim == 3:
        if spans.shape[-1] != 2:
            raise ValueError(f"{name} must have shape (B, L, 2), got {spans.shape}")
        return spans.astype(np.int64, copy=False)
    if isinstance(spans, np.ndarray) and spans.ndim == 2:
        spans = [spans]
    arrays = []
    for i, s in enumerate(spans):
        a = np.asarray(getattr(s, "spans", s), dtype=np.int64)
        if a.ndim != 2 or (a.shape[0] and a.shape[1] != 2):
            raise ValueError(f"{name}[{i}] must have shape (n, 2), got {a.shape}")
        arrays.append(a.reshape(-1, 2))
    width = max([a.shape[0] for a in arrays] + [length or 0])
    out = np.empty((len(arrays), width, 2), dtype=np.int64)
    for i, a in enumerate(arrays):
        end = int(a[:, 1].max()) if a.shape[0] else 0
        out[i, : a.shape[0]] = a
        out[i, a.shape[0]:] = end
    return out


def _check(spans: np.ndarray, name: str) -> None:
    starts, ends = spans[..., 0], spans[..., 1]
    if (ends < starts).any():
        b, i = map(int, np.argwhere(ends < starts)[0])
        raise ValueError(f"{name}[{b}, {i}] = {spans[b, i].tolist()} has end < start")
    if (starts < 0).any():
        raise ValueError(f"{name} has negative byte offsets")
    content = ends > starts
    # Non-empty spans must be disjoint and increasing within a sample.
    last_end = np.where(content, ends, -1)
    prev_end = np.maximum.accumulate(last_end, axis=1)
    bad = content[:, 1:] & (starts[:, 1:] < prev_end[:, :-1])
    if bad.any():
        b, i = map(int, np.argwhere(bad)[0])
        raise ValueError(
            f"{name}[{b}, {i + 1}] = {spans[b, i + 1].tolist()} overlaps an earlier token (spans must be disjoint and "
            "increasing); spans from TokenizerView.encode always are"
        )


def _boundaries(g_start: np.ndarray, g_end: np.ndarray) -> np.ndarray:
    """Sorted unique boundary positions of one side (starts and ends of its content tokens, already sorted)."""
    inter = np.empty(2 * g_start.shape[0], dtype=np.int64)
    inter[0::2] = g_start
    inter[1::2] = g_end
    if inter.shape[0] == 0:
        return inter
    keep = np.empty(inter.shape[0], dtype=bool)
    keep[0] = True
    np.not_equal(inter[1:], inter[:-1], out=keep[1:])
    return inter[keep]


def align_spans(teacher_spans: SpansLike, student_spans: SpansLike) -> Alignment:
    """Align two tokenizations of the same texts into chunks of equal bytes.

    Args:
        teacher_spans: ``(Lt, 2)`` spans of one sample, ``(B, Lt, 2)`` padded spans, or a list of ``(n_b, 2)``
            arrays (or :class:`~xtok_kd.tokenizer.Encoding` objects). ``[start, end)`` byte offsets; empty spans
            (``start == end``) mark tokens the text does not contain (BOS, template markers, padding).
        student_spans: the same for the student, with the same batch size.

    Returns:
        :class:`~xtok_kd.sequence.alignment.Alignment`. Token positions index the padded sequences.

    Where one side covers fewer bytes (truncation), chunks stop at the last common boundary inside both covered
    ranges; the remaining bytes are counted in ``unaligned_bytes``. Where one side skips bytes inside its range
    (a normaliser dropped characters), the chunk around the gap is removed and its bytes counted likewise.
    Cost: O(n + m) numpy work plus one ``searchsorted``.
    """
    t = pad_spans(teacher_spans, name="teacher_spans")
    s = pad_spans(student_spans, name="student_spans")
    if t.shape[0] != s.shape[0]:
        raise ValueError(
            f"batch size mismatch: {t.shape[0]} teacher sequences but {s.shape[0]} student sequences; "
            "pass one span array per text on each side"
        )
    _check(t, "teacher_spans")
    _check(s, "student_spans")
    batch = t.shape[0]
    lt, ls = t.shape[1], s.shape[1]

    # Lay the samples end to end with a one-byte gap, so one pass handles the whole batch.
    extent = np.zeros(batch, dtype=np.int64)
    if lt:
        extent = np.maximum(extent, t[..., 1].max(axis=1))
    if ls:
        extent = np.maximum(extent, s[..., 1].max(axis=1))
    base = np.zeros(batch, dtype=np.int64)
    np.cumsum(extent[:-1] + 1, out=base[1:])

    def side(spans: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        flat = spans.reshape(-1, 2)
        content = flat[:, 1] > flat[:, 0]
        pos = np.flatnonzero(content)
        shift = base[pos // spans.shape[1]] if spans.shape[1] else np.zeros(0, dtype=np.int64)
        return pos, flat[pos, 0] + shift, flat[pos, 1] + shift, content

    t_pos, t_gs, t_ge, _ = side(t)
    s_pos, s_gs, s_ge, _ = side(s)

    bt = _boundaries(t_gs, t_ge)
    bs = _boundaries(s_gs, s_ge)
    if bt.shape[0] and bs.shape[0]:
        idx = np.searchsorted(bs, bt)
        np.minimum(idx, bs.shape[0] - 1, out=idx)
        common = bt[bs[idx] == bt]
    else:
        common = np.zeros(0, dtype=np.int64)

    # Candidate chunk k = [common[k], common[k+1]); real when both ends lie in one sample.
    cand_sample = np.searchsorted(base, common, side="right") - 1
    real = cand_sample[:-1] == cand_sample[1:] if common.shape[0] > 1 else np.zeros(0, dtype=bool)
    cand_len = np.diff(common)

    n_cand = real.shape[0]

    def member(g_start: np.ndarray) -> np.ndarray:
        if not n_cand:
            return np.full(g_start.shape[0], -1, dtype=np.int64)
        k = np.searchsorted(common, g_start, side="right") - 1
        ok = (k >= 0) & (k < n_cand)
        k = np.where(ok, k, 0)
        return np.where(ok & real[k], k, -1)

    t_k = member(t_gs)
    s_k = member(s_gs)
    # A chunk is kept only where both sides cover all of its bytes (no gap on either side).
    t_cov = np.bincount(t_k[t_k >= 0], weights=(t_ge - t_gs)[t_k >= 0], minlength=n_cand)
    s_cov = np.bincount(s_k[s_k >= 0], weights=(s_ge - s_gs)[s_k >= 0], minlength=n_cand)
    keep = real & (t_cov == cand_len) & (s_cov == cand_len)
    new_id = np.cumsum(keep) - 1

    def relabel(k: np.ndarray) -> np.ndarray:
        kk = np.maximum(k, 0)
        return np.where((k >= 0) & keep[kk], new_id[kk], -1) if n_cand else k

    t_k = relabel(t_k)
    s_k = relabel(s_k)

    kept = np.flatnonzero(keep)
    chunk_sample = cand_sample[kept]
    chunk_bytes = np.stack([common[kept], common[kept + 1]], axis=1) - base[chunk_sample][:, None]
    num_chunks = kept.shape[0]

    def per_side(pos: np.ndarray, k: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        chunk_of = np.full(batch * length, -1, dtype=np.int64)
        chunk_of[pos] = k
        inside = k >= 0
        p, kk = pos[inside], k[inside]
        first = np.zeros(num_chunks, dtype=np.int64)
        count = np.bincount(kk, minlength=num_chunks).astype(np.int64)
        if kk.shape[0]:
            starts = np.ones(kk.shape[0], dtype=bool)
            starts[1:] = kk[1:] != kk[:-1]
            first[kk[starts]] = p[starts] % length
        return chunk_of.reshape(batch, length), first, count

    teacher_chunk, teacher_first, teacher_count = per_side(t_pos, t_k, lt)
    student_chunk, student_first, student_count = per_side(s_pos, s_k, ls)

    def covered(spans: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        content = spans[..., 1] > spans[..., 0]
        lo = np.where(content, spans[..., 0], np.iinfo(np.int64).max).min(axis=1, initial=np.iinfo(np.int64).max)
        hi = np.where(content, spans[..., 1], -1).max(axis=1, initial=-1)
        return lo, hi

    tlo, thi = covered(t)
    slo, shi = covered(s)
    lo = np.minimum(tlo, slo)
    hi = np.maximum(thi, shi)
    covered_bytes = np.where(hi > lo, hi - lo, 0)
    aligned = np.bincount(chunk_sample, weights=chunk_bytes[:, 1] - chunk_bytes[:, 0], minlength=batch)
    unaligned = covered_bytes - aligned.astype(np.int64)

    return Alignment(
        teacher_chunk=teacher_chunk,
        student_chunk=student_chunk,
        chunk_sample=chunk_sample,
        chunk_bytes=chunk_bytes,
        teacher_first=teacher_first,
        student_first=student_first,
        teacher_count=teacher_count,
        student_count=student_count,
        covered_bytes=covered_bytes,
        unaligned_bytes=unaligned,
    )
