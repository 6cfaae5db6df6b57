"""Edit-distance alignment: dynamic time warping over canonical token strings.

For inputs without byte spans (ids from a cache, a generation log) or whose two texts differ slightly (a template
trimmed whitespace, a normaliser rewrote a quote), byte-exact chunking does not apply. This module aligns the two
token sequences by DTW: the cost of pairing teacher token ``i`` with student token ``j`` is the normalised
Levenshtein distance between their canonical bytes (rapidfuzz, computed in C for all pairs), optionally weighted
by the two positions' prediction entropies as in CDM (Contextual Dynamic Mapping), so that confident positions
are matched first. The warping path is cut into chunks at its diagonal steps; each chunk is a run of consecutive
teacher tokens paired with a run of consecutive student tokens (1:1, 1:n or n:1).

The DP runs over anti-diagonals, each one a vectorised numpy step: O(n * m) work in O(n + m) numpy calls.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .alignment import Alignment

__all__ = ["align_tokens", "dtw_path"]


def _as_latin1(pieces: Sequence[bytes]) -> list[str]:
    # One character per byte, so string edit distance is byte edit distance.
    return [p.decode("latin-1") for p in pieces]


def dtw_path(cost: np.ndarray, *, band: int | None = None) -> np.ndarray:
    """Minimum-cost monotone path through ``cost`` from ``(0, 0)`` to ``(n-1, m-1)``.

    Steps are ``(1, 0)``, ``(0, 1)`` and ``(1, 1)``; the path cost is the sum of the visited cells.

    Args:
        cost: ``(n, m)`` non-negative float array.
        band: optional Sakoe-Chiba half-width around the (rescaled) diagonal; cells outside cost infinity.

    Returns:
        ``(P, 2)`` int64 array of visited cells in order.
    """
    n, m = cost.shape
    if n == 0 or m == 0:
        return np.zeros((0, 2), dtype=np.int64)
    cost = np.asarray(cost, dtype=np.float64)
    if band is not None:
        i = np.arange(n)[:, None] * (m / n)
        cost = np.where(np.abs(np.arange(m)[None, :] - i) <= max(band, abs(n - m) + 1), cost, np.inf)
    acc = np.full((n + 1, m + 1), np.inf)
    acc[0, 0] = 0.0
    # Anti-diagonal d holds cells (i, j) with i + j = d; all three predecessors lie on d-1 and d-2.
    for d in range(n + m - 1):
        i = np.arange(max(0, d - m + 1), min(n, d + 1))
        j = d - i
        best = np.minimum(np.minimum(acc[i, j + 1], acc[i + 1, j]), acc[i, j])
        acc[i + 1, j + 1] = cost[i, j] + best
    # Backtrack (one step per path cell; the path has at most n + m cells).
    path = [(n - 1, m - 1)]
    i, j = n, m
    while (i, j) != (1, 1):
        options = ((acc[i - 1, j - 1], i - 1, j - 1), (acc[i - 1, j], i - 1, j), (acc[i, j - 1], i, j - 1))
        _, i, j = min(options, key=lambda o: o[0])
        path.append((i - 1, j - 1))
    return np.asarray(path[::-1], dtype=np.int64)


def align_tokens(
    teacher_tokens: Sequence[bytes],
    student_tokens: Sequence[bytes],
    *,
    teacher_entropy: Any = None,
    student_entropy: Any = None,
    entropy_weight: float = 1.0,
    band: int | None = None,
    teacher_offset: int = 0,
    student_offset: int = 0,
) -> Alignment:
    """Align two token sequences by DTW over canonical bytes; returns the same :class:`Alignment` as
    :func:`~xtok_kd.sequence.align_spans` (batch of one).

    Args:
        teacher_tokens: canonical bytes of each teacher token (``[view.token_bytes(i) for i in ids]``).
        student_tokens: likewise for the student.
        teacher_entropy / student_entropy: optional ``(n,)`` / ``(m,)`` prediction entropies (nats) of the rows
            that predicted each token. With them, the cell cost is
            ``d(i, j) * (1 + entropy_weight * (H_t[i] + H_s[j]) / 2)`` (CDM's weighting: low-entropy, confident
            positions are cheap to match, so the path prefers them).
        entropy_weight: strength of that weighting (``>= 0``).
        band: optional Sakoe-Chiba half-width, to bound the path near the diagonal on long inputs.
        teacher_offset / student_offset: position of the first given token in the model input (e.g. 1 when a
            BOS precedes them), so that ``teacher_first`` indexes logits directly.

    Chunk byte ranges are in the teacher's byte coordinates (cumulative teacher token lengths), since no shared
    text exists; ``unaligned_bytes`` is 0 because every token is paired.
    """
    from rapidfuzz.distance import Levenshtein
    from rapidfuzz.process import cdist

    n, m = len(teacher_tokens), len(student_tokens)
    if n == 0 or m == 0:
        raise ValueError(f"align_tokens() needs tokens on both sides, got {n} teacher and {m} student tokens")
    if entropy_weight < 0:
        raise ValueError(f"entropy_weight must be >= 0, got {entropy_weight}")
    cost = cdist(_as_latin1(teacher_tokens), _as_latin1(student_tokens),
                 scorer=Levenshtein.normalized_distance, dtype=np.float32, workers=1).astype(np.float64)
    if (teacher_entropy is None) != (student_entropy is None):
        raise ValueError("pass both teacher_entropy and student_entropy, or neither")
    if teacher_entropy is not None:
        ht = np.asarray(teacher_entropy, dtype=np.float64).reshape(-1)
        hs = np.asarray(student_entropy, dtype=np.float64).reshape(-1)
        if ht.shape[0] != n or hs.shape[0] != m:
            raise ValueError(f"entropies must have shapes ({n},) and ({m},), got {ht.shape} and {hs.shape}")
        cost = cost * (1.0 + entropy_weight * (ht[:, None] + hs[None, :]) / 2.0)
    path = dtw_path(cost, band=band)

    # A chunk closes where the path moves diagonally; between diagonals it spreads over one side.
    diag = np.ones(path.shape[0], dtype=bool)
    diag[1:] = (np.diff(path[:, 0]) == 1) & (np.diff(path[:, 1]) == 1)
    chunk_of_cell = np.cumsum(diag) - 1
    num_chunks = int(chunk_of_cell[-1]) + 1
    teacher_chunk = np.full(n, -1, dtype=np.int64)
    student_chunk = np.full(m, -1, dtype=np.int64)
    teacher_chunk[path[:, 0]] = chunk_of_cell
    student_chunk[path[:, 1]] = chunk_of_cell
    t_count = np.bincount(teacher_chunk, minlength=num_chunks)
    s_count = np.bincount(student_chunk, minlength=num_chunks)
    t_first = np.searchsorted(teacher_chunk, np.arange(num_chunks))
    s_first = np.searchsorted(student_chunk, np.arange(num_chunks))
    lengths = np.array([len(b) for b in teacher_tokens], dtype=np.int64)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    chunk_bytes = np.stack([starts[t_first], ends[t_first + t_count - 1]], axis=1)
    pad_t = np.full(teacher_offset, -1, dtype=np.int64)
    pad_s = np.full(student_offset, -1, dtype=np.int64)
    return Alignment(
        teacher_chunk=np.concatenate([pad_t, teacher_chunk])[None],
        student_chunk=np.concatenate([pad_s, student_chunk])[None],
        chunk_sample=np.zeros(num_chunks, dtype=np.int64),
        chunk_bytes=chunk_bytes,
        teacher_first=t_first + teacher_offset,
        student_first=s_first + student_offset,
        teacher_count=t_count.astype(np.int64),
        student_count=s_count.astype(np.int64),
        covered_bytes=np.array([int(ends[-1])], dtype=np.int64),
        unaligned_bytes=np.zeros(1, dtype=np.int64),
    )
