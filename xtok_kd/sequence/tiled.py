"""Fast paths of span alignment for the usual input: spans that tile the text.

When every sample's content tokens, on both sides, are one run of positions whose spans tile a byte range from the
same first byte (complete tokenizations of the same text, as the collator produces), the common boundaries are the
first byte plus the token ends both sides share, and a chunk closes at every teacher token whose end the student
shares. That needs a third of the numpy calls of the general path in :mod:`.spans`, which these functions fall back
to (by returning None) whenever a precondition fails. Tests check both against each other and a brute force.
"""

from __future__ import annotations

import numpy as np

from .alignment import Alignment

__all__ = ["align_one_tiled", "align_tiled_batch"]

# Boundary marks are one bool per byte. Up to this many bytes, or 8 per token, that is cheap; beyond it (byte
# offsets far larger than the token count: 10**12) the general path of :mod:`.spans` first compresses the spans
# to the ranks of their offsets, so memory is bounded by the tokens, never by the largest offset.
_DENSE_BYTES = 1 << 16
_BYTES_PER_TOKEN = 8


def _too_sparse(total_bytes: float, tokens: int) -> bool:
    """True when boolean marks over ``total_bytes`` would be out of proportion to ``tokens``."""
    return total_bytes > _DENSE_BYTES and total_bytes > _BYTES_PER_TOKEN * tokens


def _run(spans: np.ndarray) -> tuple[int, int] | None:
    """``(first, stop)`` when the content tokens of one sample are one run of positions whose spans tile a byte
    range with no gap (the usual case), else None."""
    starts, ends = spans[:, 0], spans[:, 1]
    content = np.flatnonzero(ends > starts)
    if not content.shape[0]:
        return None
    first, stop = int(content[0]), int(content[-1]) + 1
    if stop - first != content.shape[0] or starts[first] < 0:
        return None
    if not np.array_equal(starts[first + 1: stop], ends[first: stop - 1]):
        return None
    return first, stop


def align_one_tiled(t: np.ndarray, s: np.ndarray) -> Alignment | None:
    """Fast path for one sample whose two sides each tile a byte range from the same first byte.

    Then the common boundaries are the first byte plus the token ends both sides share; the teacher tokens
    whose end is shared close a chunk. Same result as the general path, in a third of the numpy calls.
    Returns None (use the general path) when the preconditions do not hold."""
    t_run, s_run = _run(t), _run(s)
    if t_run is None or s_run is None or t[t_run[0], 0] != s[s_run[0], 0]:
        return None
    t_end = t[t_run[0]: t_run[1], 1]
    s_end = s[s_run[0]: s_run[1], 1]
    lo = int(t[t_run[0], 0])
    total = int(max(t_end[-1], s_end[-1])) + 1
    if _too_sparse(total, t.shape[0] + s.shape[0]):
        return None  # offsets far beyond the token count: the general path compresses them
    t_marks = np.zeros(total, dtype=bool)
    s_marks = np.zeros(total, dtype=bool)
    t_marks[t_end] = True
    s_marks[s_end] = True
    t_closes = np.flatnonzero(s_marks[t_end])  # teacher tokens ending on a common boundary
    s_closes = np.flatnonzero(t_marks[s_end])
    num_chunks = t_closes.shape[0]
    bounds = np.empty(num_chunks + 1, dtype=np.int64)
    bounds[0] = lo
    bounds[1:] = t_end[t_closes]

    def side(closes: np.ndarray, run: tuple[int, int], length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        count = np.empty(num_chunks, dtype=np.int64)
        if num_chunks:
            count[0] = closes[0] + 1
            np.subtract(closes[1:], closes[:-1], out=count[1:])
        first = closes - count + 1 + run[0]
        chunk_of = np.full((1, length), -1, dtype=np.int64)
        if num_chunks:
            chunk_of[0, run[0]: run[0] + closes[-1] + 1] = np.repeat(np.arange(num_chunks), count)
        return chunk_of, first, count

    teacher_chunk, teacher_first, teacher_count = side(t_closes, t_run, t.shape[0])
    student_chunk, student_first, student_count = side(s_closes, s_run, s.shape[0])
    covered = np.array([total - 1 - lo], dtype=np.int64)
    return Alignment(
        teacher_chunk=teacher_chunk,
        student_chunk=student_chunk,
        chunk_sample=np.zeros(num_chunks, dtype=np.int64),
        chunk_bytes=np.stack([bounds[:-1], bounds[1:]], axis=1),
        teacher_first=teacher_first,
        student_first=student_first,
        teacher_count=teacher_count,
        student_count=student_count,
        covered_bytes=covered,
        unaligned_bytes=covered - (bounds[-1] - lo),
    )


def align_tiled_batch(t: np.ndarray, s: np.ndarray) -> Alignment | None:
    """Fast path for a batch in which every sample, on both sides, is one run of tokens tiling a byte range from
    the same first byte (what the collator produces for complete texts). Same result as the general path.
    Returns None when the preconditions do not hold."""
    batch = t.shape[0]
    if batch == 0 or t.shape[1] == 0 or s.shape[1] == 0:
        return None
    sides = []
    for spans in (t, s):
        starts, ends = spans[..., 0], spans[..., 1]
        content = ends > starts
        count = content.sum(axis=1)
        first = content.argmax(axis=1)
        if not count.all() or ((ends < starts).any()) or not np.array_equal(
                content.shape[1] - content[:, ::-1].argmax(axis=1) - first, count):
            return None
        pairs = content[:, 1:] & content[:, :-1]
        if np.logical_and(pairs, starts[:, 1:] != ends[:, :-1]).any():
            return None
        lo = starts[np.arange(batch), first]
        sides.append((content, count, first, lo, ends))
    (t_content, t_count, t_first, t_lo, t_ends), (s_content, s_count, s_first, s_lo, s_ends) = sides
    if not np.array_equal(t_lo, s_lo) or (t_lo < 0).any():
        return None
    t_hi = t_ends[np.arange(batch), t_first + t_count - 1]
    s_hi = s_ends[np.arange(batch), s_first + s_count - 1]
    extent = np.maximum(t_hi, s_hi)
    if _too_sparse(float(extent.sum(dtype=np.float64)) + batch, batch * (t.shape[1] + s.shape[1])):
        return None  # offsets far beyond the token count: the general path compresses them
    base = np.zeros(batch, dtype=np.int64)
    np.cumsum(extent[:-1] + 1, out=base[1:])
    total = int(base[-1] + extent[-1]) + 1

    def flat(content: np.ndarray, count: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = np.flatnonzero(content)
        sample = np.repeat(np.arange(batch), count)
        return pos, sample, ends.ravel()[pos] + base[sample]

    t_pos, t_sample, t_gend = flat(t_content, t_count, t_ends)
    s_pos, s_sample, s_gend = flat(s_content, s_count, s_ends)
    t_marks = np.zeros(total, dtype=bool)
    s_marks = np.zeros(total, dtype=bool)
    t_marks[t_gend] = True
    s_marks[s_gend] = True
    t_close = s_marks[t_gend]  # token ends on a common boundary: it closes a chunk
    s_close = t_marks[s_gend]
    t_closes = np.flatnonzero(t_close)
    s_closes = np.flatnonzero(s_close)
    num_chunks = t_closes.shape[0]
    chunk_sample = t_sample[t_closes]
    ends = t_gend[t_closes]
    opens_sample = np.ones(num_chunks, dtype=bool)  # the chunk is its sample's first
    opens_sample[1:] = chunk_sample[1:] != chunk_sample[:-1]
    starts = np.empty(num_chunks, dtype=np.int64)
    starts[1:] = ends[:-1]
    starts[opens_sample] = (t_lo + base)[chunk_sample[opens_sample]]
    chunk_bytes = np.empty((num_chunks, 2), dtype=np.int64)
    shift = base[chunk_sample]
    np.subtract(starts, shift, out=chunk_bytes[:, 0])
    np.subtract(ends, shift, out=chunk_bytes[:, 1])

    def side(pos, sample_count, closes, length):
        chunk_of = np.full(batch * length, -1, dtype=np.int64)
        count = np.empty(num_chunks, dtype=np.int64)
        if not num_chunks:
            return chunk_of.reshape(batch, length), np.zeros(0, dtype=np.int64), count
        count[0] = closes[0] + 1
        np.subtract(closes[1:], closes[:-1], out=count[1:])
        # A sample's first chunk starts at the sample's first content token, not after the previous close.
        sample_start = np.concatenate(([0], np.cumsum(sample_count)[:-1]))
        count[opens_sample] = closes[opens_sample] - sample_start[chunk_sample[opens_sample]] + 1
        ids = np.repeat(np.arange(num_chunks), count)
        if ids.shape[0] == pos.shape[0]:  # every content token is in a chunk (no truncation)
            chunk_of[pos] = ids
        else:  # tokens after their sample's last common boundary are in no chunk
            covered = np.zeros(pos.shape[0] + 1, dtype=np.int64)
            np.add.at(covered, sample_start[np.unique(chunk_sample)], 1)
            last = np.full(batch, -1, dtype=np.int64)
            last[chunk_sample] = closes
            np.add.at(covered, last[last >= 0] + 1, -1)
            chunk_of[pos[np.cumsum(covered[:-1]) > 0]] = ids
        return chunk_of.reshape(batch, length), pos[closes - count + 1] % length, count

    teacher_chunk, teacher_first, teacher_count = side(t_pos, t_count, t_closes, t.shape[1])
    student_chunk, student_first, student_count = side(s_pos, s_count, s_closes, s.shape[1])
    covered = extent - t_lo
    # Per sample, chunks tile [lo, last common end): the aligned bytes are that range.
    last = np.full(batch, -1, dtype=np.int64)
    last[chunk_sample] = np.arange(num_chunks)  # the last write per sample wins: its last chunk
    aligned = np.where(last >= 0, ends[np.maximum(last, 0)] - base - t_lo, 0) if num_chunks else np.zeros(batch, np.int64)
    return Alignment(
        teacher_chunk=teacher_chunk,
        student_chunk=student_chunk,
        chunk_sample=chunk_sample,
        chunk_bytes=chunk_bytes,
        teacher_first=teacher_first,
        student_first=student_first,
        teacher_count=teacher_count,
        student_count=student_count,
        covered_bytes=covered,
        unaligned_bytes=covered - aligned.astype(np.int64),
    )
