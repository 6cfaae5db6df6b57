"""``Block``: the aligned rows of a few chunks, as the engine hands them to a mapping."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Block"]


@dataclass
class Block:
    """Aligned rows of ``c`` chunks, gathered, sliced to the vocabularies and cast to fp32 (fp64 for fp64 logits).

    Attributes:
        student_logits: ``(c, Vs)`` the student's aligned rows (the engine differentiates with respect to them).
        teacher_logits: ``(c, Vt)`` the teacher's aligned rows, or None when the teacher is given as top-k.
        teacher_topk_ids / teacher_topk_logp: ``(c, k)`` cached teacher top-k (ids and log-probabilities), or None.
            A negative id is an empty slot; its log-probability is ``-inf`` (the module sets it so).
        teacher_vocab_size: ``Vt`` (needed to densify a top-k teacher).
        student_factor / teacher_factor: ``(c,)`` log of the chunk-merge factor (sum of the log-probabilities of
            the chunk's other actual tokens, see ``merge``), or None for no merge.
        temperature: ``T``; logits are divided by it before the softmax.
        student_loglik / teacher_loglik: ``(c,)`` log-likelihood of each chunk's actual tokens (the sum over the
            chunk of each token's log-probability at temperature ``T``, floored per token at ``log 1e-8``), filled
            only for a mapping that asks for it (``needs_loglik``); the student's is differentiable.
    """

    student_logits: torch.Tensor
    teacher_logits: torch.Tensor | None
    teacher_topk_ids: torch.Tensor | None
    teacher_topk_logp: torch.Tensor | None
    teacher_vocab_size: int
    student_factor: torch.Tensor | None
    teacher_factor: torch.Tensor | None
    temperature: float
    student_loglik: torch.Tensor | None = None
    teacher_loglik: torch.Tensor | None = None
