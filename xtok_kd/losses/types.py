"""The loss's inputs and outputs, and the one ``Direction`` type: shared by the module, the engine and every mapping."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ..directions import Direction as _Direction

__all__ = ["Direction", "KDLossOutput", "TeacherTopK", "other_side"]

#: Which way a projection runs (see :mod:`xtok_kd.directions`, the one place the names are translated).
Direction = _Direction


def other_side(side: str) -> str:
    """``"teacher"`` <-> ``"student"``."""
    return "student" if side == "teacher" else "teacher"


class TeacherTopK(NamedTuple):
    """A cached teacher: its ``k`` most likely next tokens per position (saves ``Vt / k`` of the memory).

    Attributes:
        ids: ``(B, Lt, k)`` integer token ids in ``[0, Vt)``. A negative id (``-1`` is the usual value) is an empty
            slot: it carries no mass and its log-probability is ignored (treated as ``-inf``), so a row with empty
            slots is the same as a row without them. An id ``>= Vt`` in a row the loss reads raises ``ValueError``
            naming the id, the batch index, position and slot, and ``Vt`` (the cache is of another vocabulary).
        logprobs: ``(B, Lt, k)`` their log-probabilities under the full softmax at temperature 1 (``<= 0``, their
            probabilities summing to at most 1; ``-inf`` is a ruled-out token). NaN, ``+inf``, a positive value or a
            sum of probabilities above 1 (raw logits, not log-probabilities) in a row the loss reads raise, as does an
            id repeated within a row.
        next_token_logprobs: ``(B, Lt)`` or None: at position ``i``, the teacher's log-probability of its own next
            token ``teacher_input_ids[:, i + 1]`` (the last position's value is never read). Needed by
            ``mapping="alm"`` (chunk likelihoods), which a top-k alone cannot give; other mappings ignore it.
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    next_token_logprobs: torch.Tensor | None = None


@dataclass
class KDLossOutput:
    """Result of :class:`~xtok_kd.losses.CrossTokenizerKDLoss`.

    Attributes:
        loss: scalar (``reduction`` mean/sum) or ``(K,)`` per aligned chunk (``none``).
        metrics: plain floats: ``aligned_share`` (share of covered bytes inside chunks), ``dropped_chunks`` (chunks
            with no aligned row on a side), ``chunks`` (chunks in the loss), and the mapping's means (see each
            mapping's ``metric_names``): ``teacher_mass_mapped`` (projection), ``uld_bound`` (uld: the exact sorted
            L1 lies within this of the top-k value, 0 when exact), ``teacher_mass_matched`` (hybrid), and those of
            sinkhorn, cdm and alm.
    """

    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)
