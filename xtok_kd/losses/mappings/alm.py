"""``mapping="alm"``: approximate likelihood matching (tokenkit's ALM, Minixhofer et al. 2025).

No vocabulary mapping at all: a chunk has the same bytes on both sides, so both models assign it a likelihood, the
product of the probabilities of the chunk's actual tokens. ALM compares the two likelihoods ``p_c`` (teacher) and
``q_c`` (student) of every aligned chunk as Bernoulli distributions ("this chunk comes next" or not), i.e. with a
*binarised* f-divergence:

* ``binary_kl`` (default): ``KL(Bern(p) || Bern(q)) = p log(p / q) + (1 - p) log((1 - p) / (1 - q))``;
* ``abs_diff``: ``|log p - log q|``, the absolute difference of the log-likelihoods.

Both are 0 for identical inputs (same tokenizer, same logits). The log-likelihoods are sums over the chunk of each
token's log-probability at temperature ``T``, floored per token at ``log 1e-8`` (the engine's merge floor), from the
rows ``student_input_ids`` / ``teacher_input_ids`` name; a cached teacher gives them through
``TeacherTopK.next_token_logprobs``. Because it reads every token of a chunk and nothing of the vocabulary, ALM works
for any pair of tokenizers, related or not, and its cost is independent of the vocabulary sizes beyond one
log-softmax per row.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..block import Block
from .base import MappingMethod

__all__ = ["AlmMapping", "binary_kl", "log1mexp"]

#: Log-likelihoods are kept at or below this so that ``log(1 - p)`` stays finite (a chunk of probability 1).
_MAX_LOGLIK = -1e-6


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate near 0 and for very negative ``x``. ``(N,) -> (N,)``."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def binary_kl(teacher_loglik: torch.Tensor, student_loglik: torch.Tensor) -> torch.Tensor:
    """``KL(Bern(p) || Bern(q))`` from ``log p``, ``log q`` ``(N,)`` (each ``<= _MAX_LOGLIK``). ``-> (N,)``, >= 0."""
    t, s = teacher_loglik, student_loglik
    return t.exp() * (t - s) + (-torch.expm1(t)) * (log1mexp(t) - log1mexp(s))


class AlmMapping(MappingMethod):
    """Chunk likelihoods compared by a binarised f-divergence (``alm_divergence``). Needs both sides' input ids.

    Metrics: ``alm_loglik_gap`` (mean ``|log p_c - log q_c|`` over chunks, in nats).
    """

    name = "alm"
    metric_names = ("alm_loglik_gap",)
    plan_merge = "observed"
    needs_loglik = True

    def rows(self, block: Block, buffers: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        t, s = block.teacher_loglik, block.student_loglik
        if t is None or s is None:
            raise ValueError("mapping='alm' needs the chunk log-likelihoods of both sides")
        gap = (t - s).abs()
        if self.options.alm_divergence == "abs_diff":
            return gap, {"alm_loglik_gap": gap.detach()}
        loss = binary_kl(t.clamp_max(_MAX_LOGLIK), s.clamp_max(_MAX_LOGLIK))
        return loss, {"alm_loglik_gap": gap.detach()}
