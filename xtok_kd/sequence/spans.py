"""Byte-span alignment: linear-time, vectorised, batched.

Given the byte spans of the same text under two tokenizers, the chunk boundaries are the byte positions where
both sides have a token boundary. Each side marks its boundaries in a boolean array over the bytes; the other
side looks its own token starts up in it, and a running count of the hits numbers the chunks. Every step is a
linear vectorised pass (no Python loop over tokens or samples): O(n + m + bytes). Inputs whose spans simply tile
the text take the leaner paths in :mod:`.tiled`; this module's general path handles the rest (gaps, truncation
inside a token, empty samples). Where byte offsets are far larger than the token count (a span ending at byte
10**12), the spans are first replaced by the ranks of their distinct offsets, so memory stays O(tokens).
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple, Sequence, Union

import numpy as np

from .alignment import Alignment
from .tiled import _too_sparse, align_one_tiled, align_tiled_batch

__all__ = ["align_spans", "pad_spans"]

SpansLike = Union[np.ndarray, Sequence[np.ndarray]]


class _Side(NamedTuple):
    pos: np.ndarray  # flat positions (b * L + i) of the content tokens
    g_start: np.ndarray  # their byte starts / ends in batch-global coordinates
    g_end: np.ndarray
    gaps: np.ndarray  # content tokens whose end is not the next one's start (gap, sample end, last token)
    per_sample: np.ndarray  # (B,) number of content tokens per sample
    marks: np.ndarray  # (total,) bool, True at every boundary byte


def _as_offsets(x: object, name: str) -> np.ndarray:
    """``x`` (array-like or torch tensor) as an int64 array of byte offsets, refusing anything not integral:
    floats are accepted only when every value is a finite whole number (then cast), never truncated."""
    if type(x) is np.ndarray and x.dtype == np.int64:  # the usual input: nothing to check or convert
        return x
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor (maybe on an accelerator)
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    kind = arr.dtype.kind
    if kind == "i":
        return arr.astype(np.int64, copy=False)
    fix = ("spans are [start, end) byte offsets and must be integers (Encoding.spans from TokenizerView.encode "
           "are int64); pass an integer array (np.int64 / torch.long)")
    if kind == "u":
        if arr.size and int(arr.max()) > np.iinfo(np.int64).max:
            at = ", ".join(str(int(i)) for i in np.unravel_index(int(arr.argmax()), arr.shape))
            raise ValueError(f"{name}[{at}] = {int(arr.max())} does not fit int64; {fix}")
        return arr.astype(np.int64)
    if kind == "f":
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(arr) | (arr != np.round(arr)) | (np.abs(arr) >= 2.0**62)
        if bad.any():
            flat = int(np.flatnonzero(bad.ravel())[0])
            at = ", ".join(str(int(i)) for i in np.unravel_index(flat, arr.shape))
            value = float(arr.ravel()[flat])
            what = "NaN" if np.isnan(value) else "infinite" if np.isinf(value) else (
                "fractional" if value != round(value) else "out of range")
            raise ValueError(
                f"{name}[{at}] = {value!r} is {what}, not a byte offset ({int(bad.sum())} such value(s) in "
                f"{name}, dtype {arr.dtype}); {fix}. Whole-number floats are accepted; nothing is rounded or "
                "truncated silently"
            )
        return arr.astype(np.int64)
    raise ValueError(f"{name} has dtype {arr.dtype} ({type(x).__name__}); {fix}")


def pad_spans(spans: SpansLike, *, name: str = "spans") -> np.ndarray:
    """``(B, L, 2)`` int64 spans from a ``(B, L, 2)`` or ``(L, 2)`` array or a list of ``(n_b, 2)`` arrays
    (or Encodings); numpy arrays, torch tensors or nested lists. Padding positions get an empty span at the
    sample's last byte.

    Raises:
        ValueError: for a wrong shape, or offsets that are not integers (fractional, NaN or infinite floats,
            non-numeric values), naming the first offending position and value.
    """
    if not isinstance(spans, (list, tuple)):
        arr = _as_offsets(spans, name)
        if arr.ndim == 2 and arr.shape[-1] == 2:
            return arr[None]
        if arr.ndim == 3 and arr.shape[-1] == 2:
            return arr
        raise ValueError(f"{name} must have shape (L, 2) or (B, L, 2), got {arr.shape}")
    arrays = []
    for i, s in enumerate(spans):
        a = _as_offsets(getattr(s, "spans", s), f"{name}[{i}]")
        if a.size == 0:
            a = a.reshape(0, 2)
        if a.ndim != 2 or a.shape[1] != 2:
            raise ValueError(f"{name}[{i}] must have shape (n, 2), got {a.shape}")
        arrays.append(a)
    width = max([a.shape[0] for a in arrays], default=0)
    out = np.empty((len(arrays), width, 2), dtype=np.int64)
    for i, a in enumerate(arrays):
        out[i, : a.shape[0]] = a
        out[i, a.shape[0]:] = a[:, 1].max() if a.shape[0] else 0
    return out


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
    Cost: O(n + m + bytes) vectorised numpy work; O((n + m) log(n + m)) and O(n + m) memory when the offsets are
    much larger than the token count.

    Raises:
        ValueError: spans that are not integer byte offsets (fractional, NaN or infinite floats; whole-number
            floats are accepted), negative, overlapping or reversed spans, or a batch size mismatch; the message
            names the offending position and value.
    """
    t = pad_spans(teacher_spans, name="teacher_spans")
    s = pad_spans(student_spans, name="student_spans")
    if t.shape[0] != s.shape[0]:
        raise ValueError(
            f"batch size mismatch: {t.shape[0]} teacher sequences but {s.shape[0]} student sequences; "
            "pass one span array per text on each side"
        )
    simple = align_one_tiled(t[0], s[0]) if t.shape[0] == 1 else align_tiled_batch(t, s)
    return simple if simple is not None else _align_batch(t, s)


def _align_batch(t: np.ndarray, s: np.ndarray, shown: tuple[np.ndarray, np.ndarray] | None = None) -> Alignment:
    """The general path: padded ``(B, L, 2)`` spans, gaps, truncation, empty samples. ``shown``: the original
    spans when ``t``/``s`` are their compressed ranks (error messages quote the original values)."""
    batch, lt, ls = t.shape[0], t.shape[1], s.shape[1]

    # Lay the samples end to end with a one-byte gap, so one pass handles the whole batch.
    extent = np.zeros(batch, dtype=np.int64)
    for spans in (t, s):
        if spans.shape[1]:
            np.maximum(extent, spans[..., 1].max(axis=1), out=extent)
    if shown is None and _too_sparse(float(extent.sum(dtype=np.float64)) + batch, batch * (lt + ls)):
        return _align_compressed(t, s)
    base = np.zeros(batch, dtype=np.int64)
    np.cumsum(extent[:-1] + 1, out=base[1:])
    total = int(base[-1] + extent[-1]) + 1 if batch else 1

    ts = _side(t, "teacher_spans", base, total, None if shown is None else shown[0])
    ss = _side(s, "student_spans", base, total, None if shown is None else shown[1])
    t_rank, common = _ranks(ts, ss.marks)
    s_rank, _ = _ranks(ss, ts.marks, want_common=False)

    # Candidate chunk k = [common[k], common[k + 1]). It is a chunk when both ends lie in one sample and
    # neither side skips bytes inside it (a normaliser that dropped text).
    n_cand = max(common.shape[0] - 1, 0)
    cand_sample = np.searchsorted(base, common, side="right") - 1 if batch > 1 else np.zeros_like(common)
    keep = cand_sample[:-1] == cand_sample[1:] if n_cand else np.zeros(0, dtype=bool)
    for sd, rank, other in ((ts, t_rank, ss.marks), (ss, s_rank, ts.marks)):
        inner = sd.gaps[:-1]  # the last token's end closes the side: no gap after it
        k = rank[inner] + other[sd.g_end[inner]]
        keep[k[(k >= 0) & (k < n_cand)]] = False
    kept = np.flatnonzero(keep)
    num_chunks = kept.shape[0]
    # Chunk id of a token = lut[rank + 1]: -1 before the first and after the last common boundary.
    lut = np.full(n_cand + 2, -1, dtype=np.int64)
    lut[kept + 1] = np.arange(num_chunks)

    chunk_sample = cand_sample[kept]
    chunk_bytes = np.empty((num_chunks, 2), dtype=np.int64)
    chunk_bytes[:, 0] = common[kept]
    chunk_bytes[:, 1] = common[kept + 1]
    if batch > 1:
        chunk_bytes -= base[chunk_sample][:, None]

    teacher_chunk, teacher_first, teacher_count = _members(ts, lut[t_rank + 1], batch, lt, num_chunks)
    student_chunk, student_first, student_count = _members(ss, lut[s_rank + 1], batch, ls, num_chunks)

    # Covered bytes per sample: from the first to the last byte either side covers.
    t_lo, t_hi = _sample_extent(ts, base)
    s_lo, s_hi = _sample_extent(ss, base)
    # A side with no content in a sample (lo == hi) must not stretch the range to the sample's start.
    t_lo, t_hi = np.where(t_hi > t_lo, t_lo, s_lo), np.where(t_hi > t_lo, t_hi, s_hi)
    s_lo, s_hi = np.where(s_hi > s_lo, s_lo, t_lo), np.where(s_hi > s_lo, s_hi, t_hi)
    covered_bytes = np.maximum(t_hi, s_hi) - np.minimum(t_lo, s_lo)
    lengths = np.concatenate(([0], np.cumsum(chunk_bytes[:, 1] - chunk_bytes[:, 0])))
    edges = np.searchsorted(chunk_sample, np.arange(batch + 1))
    unaligned = covered_bytes - (lengths[edges[1:]] - lengths[edges[:-1]])

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


def _side(spans: np.ndarray, name: str, base: np.ndarray, total: int, shown: np.ndarray | None = None) -> _Side:
    """Content tokens of one side in global byte coordinates, validated, with boundary marks per byte."""
    batch, length = spans.shape[0], spans.shape[1]
    starts, ends = spans[..., 0].ravel(), spans[..., 1].ravel()
    if shown is not None:  # compressed ranks: validate against the original offsets, quote those
        starts_shown, ends_shown = shown[..., 0].ravel(), shown[..., 1].ravel()
    else:
        starts_shown, ends_shown = starts, ends
    width = ends - starts
    if (width < 0).any():
        i = int(np.flatnonzero(width < 0)[0])
        raise ValueError(f"{name}[{divmod(i, length)}] = [{starts_shown[i]}, {ends_shown[i]}] has end < start")
    content = width > 0
    pos = np.flatnonzero(content)
    if pos.shape[0] and pos[-1] - pos[0] + 1 == pos.shape[0]:  # one run (the usual case): slice, don't gather
        g_start, g_end = starts[pos[0]: pos[-1] + 1].copy(), ends[pos[0]: pos[-1] + 1].copy()
    else:
        g_start, g_end = starts[pos], ends[pos]
    per_sample = content.reshape(batch, length).sum(axis=1) if length else np.zeros(batch, dtype=np.int64)
    if batch > 1:
        shift = np.repeat(base, per_sample)
        g_start += shift
        g_end += shift
    if shown is not None:
        negative = (starts_shown < 0) & content
        if negative.any():
            raise ValueError(f"{name} has a negative byte offset ({starts_shown[negative][0]})")
    elif g_start.shape[0] and g_start[0] < 0:
        raise ValueError(f"{name} has a negative byte offset ({g_start[0]})")
    step = g_start[1:] - g_end[:-1]
    if (step < 0).any():
        i = int(pos[1:][step < 0][0])
        raise ValueError(
            f"{name}[{divmod(i, length)}] = [{starts_shown[i]}, {ends_shown[i]}] overlaps an earlier token; spans "
            "must be disjoint and increasing (spans from TokenizerView.encode always are)"
        )
    gaps = np.flatnonzero(step != 0)
    if g_end.shape[0]:
        gaps = np.append(gaps, g_end.shape[0] - 1)
    marks = np.zeros(total, dtype=bool)
    marks[g_start] = True
    marks[g_end[gaps]] = True
    return _Side(pos, g_start, g_end, gaps, per_sample, marks)


def _ranks(sd: _Side, other_marks: np.ndarray, *, want_common: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """For each content token, the index of the last common boundary at or before its start (-1 if none);
    and the sorted common boundaries. A common boundary is a token start of this side that the other side marks,
    or an end followed by a gap that it marks."""
    start_common = other_marks[sd.g_start]
    rank = np.cumsum(start_common) - 1
    common = sd.g_start[start_common] if want_common else None
    gap_common = other_marks[sd.g_end[sd.gaps]]
    if gap_common[:-1].any():
        hit = sd.gaps[gap_common]
        if want_common:  # such an end comes right after the common starts up to its own token
            common = np.insert(common, rank[hit] + 1, sd.g_end[hit])
        later = np.zeros(rank.shape[0] + 1, dtype=np.int64)
        later[hit + 1] = 1
        rank += np.cumsum(later[:-1])
    elif want_common and gap_common.shape[0] and gap_common[-1]:  # the usual case: only the very last end
        common = np.append(common, sd.g_end[-1])
    return rank, common


def _members(sd: _Side, chunk: np.ndarray, batch: int, length: int, num_chunks: int):
    """Per-token chunk ids as ``(B, L)``, and each chunk's first token position and token count."""
    chunk_of = np.full(batch * length, -1, dtype=np.int64)
    if sd.pos.shape[0] and sd.pos[-1] - sd.pos[0] + 1 == sd.pos.shape[0]:
        chunk_of[sd.pos[0]: sd.pos[-1] + 1] = chunk
    else:
        chunk_of[sd.pos] = chunk
    first = np.zeros(num_chunks, dtype=np.int64)
    count = np.zeros(num_chunks, dtype=np.int64)
    if chunk.shape[0]:
        # Chunk ids never decrease along the tokens, so each chunk's tokens form one run.
        change = np.empty(chunk.shape[0], dtype=bool)
        change[0] = True
        np.not_equal(chunk[1:], chunk[:-1], out=change[1:])
        opens = np.flatnonzero(change)
        ids = chunk[opens]
        runs = np.empty_like(opens)
        np.subtract(opens[1:], opens[:-1], out=runs[:-1])
        runs[-1] = chunk.shape[0] - opens[-1]
        ok = ids >= 0
        if not ok.all():
            ids, opens, runs = ids[ok], opens[ok], runs[ok]
        at = sd.pos[opens]
        first[ids] = at % length if batch > 1 else at
        count[ids] = runs
    return chunk_of.reshape(batch, length), first, count


def _sample_extent(sd: _Side, base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First covered byte and last covered byte + 1 of each sample (global coordinates; lo == hi if empty)."""
    close = np.cumsum(sd.per_sample)
    open_ = close - sd.per_sample
    has = sd.per_sample > 0
    if not has.any():
        return base.copy(), base.copy()
    lo = np.where(has, sd.g_start[np.minimum(open_, sd.g_start.shape[0] - 1)], base)
    hi = np.where(has, sd.g_end[np.maximum(close - 1, 0)], base)
    return lo, hi


def _align_compressed(t: np.ndarray, s: np.ndarray) -> Alignment:
    """The general path on the ranks of each sample's distinct offsets, for spans whose offsets dwarf the token
    count. Ranks keep every equality and order between offsets, so chunks and token membership are the same;
    chunk byte ranges and byte counts are mapped back to the original offsets. Memory: O(B * (Lt + Ls))."""
    batch, wt = t.shape[0], 2 * t.shape[1]
    values = np.concatenate([t.reshape(batch, -1), s.reshape(batch, -1)], axis=1)
    order = np.argsort(values, axis=1, kind="stable")
    ordered = np.take_along_axis(values, order, axis=1)
    new = np.ones(ordered.shape, dtype=bool)
    new[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    ranked = np.cumsum(new, axis=1) - 1
    ranks = np.empty_like(values)
    np.put_along_axis(ranks, order, ranked, axis=1)
    value_of = np.zeros(values.shape, dtype=np.int64)  # value_of[b, rank]
    value_of[np.nonzero(new)[0], ranked[new]] = ordered[new]
    al = _align_batch(ranks[:, :wt].reshape(t.shape), ranks[:, wt:].reshape(s.shape), shown=(t, s))

    chunk_bytes = value_of[al.chunk_sample[:, None], al.chunk_bytes]
    # Covered: from the first to the last byte either side covers (a side without content does not stretch it).
    lo = np.full(batch, np.iinfo(np.int64).max, dtype=np.int64)
    hi = np.full(batch, np.iinfo(np.int64).min, dtype=np.int64)
    for spans in (t, s):
        content = spans[..., 1] > spans[..., 0]
        if spans.shape[1]:
            np.minimum(lo, np.where(content, spans[..., 0], lo[:, None]).min(axis=1), out=lo)
            np.maximum(hi, np.where(content, spans[..., 1], hi[:, None]).max(axis=1), out=hi)
    covered = np.where(hi > lo, hi - lo, 0).astype(np.int64)
    aligned = np.zeros(batch, dtype=np.int64)
    np.add.at(aligned, al.chunk_sample, chunk_bytes[:, 1] - chunk_bytes[:, 0])
    return replace(al, chunk_bytes=chunk_bytes, covered_bytes=covered, unaligned_bytes=covered - aligned)
