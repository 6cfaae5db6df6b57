"""The Alignment: which teacher tokens and which student tokens cover the same bytes.

Vocabulary (see DESIGN.md): a *chunk* is a maximal run of bytes delimited by positions where both tokenizations
have a token boundary; both sides of a chunk cover exactly the same bytes and no token is split. The *aligned row*
of a chunk on one side is the logits row that predicts the chunk's first token (row ``i - 1`` for a chunk whose
first token sits at position ``i``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

__all__ = ["Alignment", "AlignedRows"]


@dataclass(frozen=True)
class AlignedRows:
    """Index tensors for the chunks that have an aligned row on both sides (what a loss consumes).

    All tensors are ``(K,)`` int64 (``loss_mask`` bool), ``K`` = number of usable chunks, in chunk order.

    Attributes:
        sample: batch index of each chunk.
        teacher_row / student_row: the aligned row (``first - 1``) on each side.
        teacher_first / student_first: position of the chunk's first token.
        teacher_count / student_count: number of tokens of the chunk on each side (tokens are contiguous).
        num_bytes: bytes the chunk covers.
        loss_mask: chunks that count towards the loss (False for prompt content when training on answers only).
    """

    sample: Any
    teacher_row: Any
    student_row: Any
    teacher_first: Any
    student_first: Any
    teacher_count: Any
    student_count: Any
    num_bytes: Any
    loss_mask: Any

    def __len__(self) -> int:
        return int(self.sample.shape[0])


@dataclass(frozen=True)
class Alignment:
    """Chunks of a batch of (teacher, student) tokenizations of the same texts.

    Token positions index the (padded) token sequences that were aligned, so they index the models' logits
    directly. ``B`` is the batch size, ``Lt``/``Ls`` the padded lengths, ``C`` the number of chunks.

    Attributes:
        teacher_chunk: ``(B, Lt)`` int64 chunk index of every teacher token; -1 for tokens in no chunk (BOS,
            template markers, padding, bytes the other side does not cover).
        student_chunk: ``(B, Ls)`` likewise for the student.
        chunk_sample: ``(C,)`` batch index of each chunk. Chunks are ordered by sample, then by bytes.
        chunk_bytes: ``(C, 2)`` ``[start, end)`` byte range of each chunk in its sample's byte coordinates.
        teacher_first / student_first: ``(C,)`` position of each chunk's first token on each side.
        teacher_count / student_count: ``(C,)`` number of tokens of each chunk on each side.
        covered_bytes: ``(B,)`` bytes of the text from its first to the last byte that either side's tokens
            cover. From :func:`~xtok_kd.sequence.align_spans`: the range between the first and the last byte
            either side covers. From the collator: the content bytes of that range only, so the separators it
            puts between chat messages, and messages both templates drop, are not counted.
        unaligned_bytes: ``(B,)`` of those, bytes in no chunk (one side truncated, a normaliser dropped text,
            a straddling token at a truncation point or a template seam, a message only one side's template
            renders). Reported, never silently paired.
        chunk_loss_mask: ``(C,)`` bool, chunks that count towards the loss (all True unless a collator masks
            prompt content).
        truncated_bytes: ``(B,)`` content bytes past the last byte either side kept: lost to truncation on both
            sides, so in neither ``covered_bytes`` nor any chunk (an example truncated to nothing has all its
            content here). ``None`` (unknown) from :func:`~xtok_kd.sequence.align_spans`, which does not know
            the text; the collator sets it.
        teacher_fingerprint / student_fingerprint: :attr:`~xtok_kd.TokenizerView.fingerprint` of the tokenizers
            that produced the spans, when known (the collator sets them; ``align_spans`` cannot). A loss can
            refuse an alignment whose fingerprints differ from its vocabulary table's. ``None`` = unknown.

    ``aligned_share = sum(covered_bytes - unaligned_bytes) / sum(covered_bytes)``: 1.0 for two complete
    tokenizations of the same content.
    """

    teacher_chunk: np.ndarray
    student_chunk: np.ndarray
    chunk_sample: np.ndarray
    chunk_bytes: np.ndarray
    teacher_first: np.ndarray
    student_first: np.ndarray
    teacher_count: np.ndarray
    student_count: np.ndarray
    covered_bytes: np.ndarray
    unaligned_bytes: np.ndarray
    chunk_loss_mask: np.ndarray = field(default=None)  # type: ignore[assignment]
    truncated_bytes: np.ndarray | None = None
    teacher_fingerprint: str | None = None
    student_fingerprint: str | None = None

    def __post_init__(self) -> None:
        if self.chunk_loss_mask is None:
            object.__setattr__(self, "chunk_loss_mask", np.ones(self.num_chunks, dtype=bool))

    # ------------------------------------------------------------------ sizes
    @property
    def batch_size(self) -> int:
        return int(self.teacher_chunk.shape[0])

    @property
    def num_chunks(self) -> int:
        return int(self.chunk_sample.shape[0])

    @property
    def has_rows(self) -> np.ndarray:
        """``(C,)`` bool: the chunk has an aligned row on both sides (its first token is not at position 0)."""
        return (self.teacher_first >= 1) & (self.student_first >= 1)

    @property
    def dropped_chunks(self) -> int:
        """Chunks without an aligned row on one side (text starting at position 0 with no BOS)."""
        return int((~self.has_rows).sum())

    @property
    def aligned_bytes(self) -> int:
        return int((self.chunk_bytes[:, 1] - self.chunk_bytes[:, 0]).sum())

    @property
    def aligned_share(self) -> float:
        """Share of covered bytes that lie in a chunk: ``sum(covered - unaligned) / sum(covered)`` (1.0 for two
        complete tokenizations of one text; 0.0 when nothing is covered)."""
        total = int(self.covered_bytes.sum())
        return int(total - self.unaligned_bytes.sum()) / total if total else 0.0

    @property
    def one_to_one_share(self) -> float:
        """Share of chunks made of exactly one token on each side."""
        if not self.num_chunks:
            return 0.0
        return float(((self.teacher_count == 1) & (self.student_count == 1)).mean())

    # ------------------------------------------------------------------ views
    def with_loss_mask(self, chunk_loss_mask: np.ndarray) -> "Alignment":
        """A copy whose ``chunk_loss_mask`` is replaced (``(C,)`` bool)."""
        mask = np.asarray(chunk_loss_mask, dtype=bool)
        if mask.shape != (self.num_chunks,):
            raise ValueError(f"chunk_loss_mask must have shape ({self.num_chunks},), got {mask.shape}")
        return replace(self, chunk_loss_mask=mask)

    def rows(self, device: Any = None, *, only_loss: bool = False) -> AlignedRows:
        """Aligned rows of the usable chunks as torch tensors on ``device``.

        Args:
            device: torch device for the index tensors.
            only_loss: keep only chunks whose ``chunk_loss_mask`` is True.
        """
        import torch

        keep = self.has_rows
        if only_loss:
            keep = keep & self.chunk_loss_mask

        def t(x: np.ndarray) -> Any:
            return torch.as_tensor(np.ascontiguousarray(x[keep]), device=device)

        return AlignedRows(
            sample=t(self.chunk_sample),
            teacher_row=t(self.teacher_first - 1),
            student_row=t(self.student_first - 1),
            teacher_first=t(self.teacher_first),
            student_first=t(self.student_first),
            teacher_count=t(self.teacher_count),
            student_count=t(self.student_count),
            num_bytes=t(self.chunk_bytes[:, 1] - self.chunk_bytes[:, 0]),
            loss_mask=t(self.chunk_loss_mask),
        )

    def chunk_tokens(self, chunk: int) -> tuple[range, range]:
        """Teacher and student token positions of one chunk (for inspection and tests)."""
        tf, tc = int(self.teacher_first[chunk]), int(self.teacher_count[chunk])
        sf, sc = int(self.student_first[chunk]), int(self.student_count[chunk])
        return range(tf, tf + tc), range(sf, sf + sc)

    def summary(self) -> dict[str, float]:
        """Plain-number metrics: chunks, dropped chunks, aligned share of bytes, unaligned and truncated bytes,
        1:1 share, mean chunk sizes."""
        return {
            "chunks": float(self.num_chunks),
            "dropped_chunks": float(self.dropped_chunks),
            "aligned_share": self.aligned_share,
            "unaligned_bytes": float(self.unaligned_bytes.sum()),
            "truncated_bytes": float(self.truncated_bytes.sum()) if self.truncated_bytes is not None else 0.0,
            "one_to_one_share": self.one_to_one_share,
            "mean_teacher_tokens_per_chunk": float(self.teacher_count.mean()) if self.num_chunks else 0.0,
            "mean_student_tokens_per_chunk": float(self.student_count.mean()) if self.num_chunks else 0.0,
        }
