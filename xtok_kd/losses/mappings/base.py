"""What a mapping is: the small protocol every ``mapping=`` implements, and the helpers several of them share.

A mapping makes one block of aligned teacher and student rows comparable and returns per-chunk losses. It is one
class in one module of this package plus one line in :data:`xtok_kd.losses.mappings.MAPPINGS`:

* class attributes say what it needs: ``metric_names``, ``accepts_topk`` (works from a cached teacher's top-k),
  ``merges`` (the ``merge`` values it accepts), ``plan_merge`` (a merge it always runs with, e.g. ``alm``),
  ``needs_loglik`` (the engine fills the block's chunk log-likelihoods), ``needs_table``;
* ``problems(options, table)`` lists what is wrong with the knobs for this mapping (the module raises them all);
* ``buffers(options, table, sizes)`` derives tensors from the table ONCE; the module registers them as buffers, so
  they follow ``.to(device)`` and are never rebuilt per forward;
* ``rows(block, buffers)`` computes ``(loss (c,), {metric: (c,)})`` for one block under autograd; the engine
  differentiates it with respect to the block's student rows.

Nothing here keeps state between calls.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..block import Block
from ..divergences import LOG_FLOOR
from ..options import LossOptions

__all__ = ["MappingMethod", "divergence_knobs", "one_tokenizer", "teacher_top", "log_normalised", "merged_probs", "safe_log", "scaled", "teacher_logp"]


class MappingMethod:
    """Base class of the mappings (see the module docstring). Subclasses set the class attributes and ``rows``."""

    name: ClassVar[str] = ""
    metric_names: ClassVar[tuple[str, ...]] = ()
    accepts_topk: ClassVar[bool] = True
    merges: ClassVar[tuple[str, ...]] = ("none",)
    plan_merge: ClassVar[str | None] = None
    needs_loglik: ClassVar[bool] = False
    needs_table: ClassVar[bool] = False
    transient: ClassVar[tuple[str, ...]] = ()  # buffers kept out of the state dict (e.g. a model's embeddings)

    def __init__(self, options: LossOptions) -> None:
        self.options = options

    @classmethod
    def problems(cls, options: LossOptions, table: Any) -> list[str]:
        """What is wrong with ``options`` for this mapping, given the (possibly None) table."""
        if cls.needs_table and table is None:
            return [f"mapping={cls.name!r} needs table= (xtok_kd.vocab.VocabAlignment.build(teacher, student)) or "
                    "teacher= and student= tokenizers"]
        return []

    @classmethod
    def wants_table(cls, options: LossOptions) -> bool:
        """Whether ``teacher=``/``student=`` tokenizers should be turned into a table for these options."""
        return cls.needs_table

    def summarise(self, per_chunk: torch.Tensor) -> torch.Tensor:
        """``(K, M)`` per-chunk metrics -> ``(M,)`` reported values (default: the mean over chunks)."""
        return per_chunk.mean(0)

    def buffers(self, table: Any, teacher_vocab_size: int | None,
                student_vocab_size: int | None) -> dict[str, torch.Tensor | None]:
        """Tensors derived once from the table (registered as the module's buffers under these names)."""
        return {}

    def rows(self, block: Block, buffers: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss (c,), {name: (c,)})`` for the block's ``c`` chunks."""
        raise NotImplementedError

    def sequence_losses(self, student_logits: torch.Tensor, teacher: Any, alignment: Any, *, student_width: int,
                        teacher_width: int, temperature: float) -> tuple[torch.Tensor, dict[str, float]] | None:
        """An optional per-sequence term ``(B,)`` (plus metrics) that the module adds to each chunk of the sequence;
        None (the default) for none. It sees whole sequences, not blocks of aligned rows."""
        return None


def divergence_knobs(options: LossOptions) -> dict[str, Any]:
    """The keyword arguments of :func:`~xtok_kd.losses.divergences.divergence` taken from the options."""
    return {"kind": options.divergence, "beta": options.beta, "alpha": options.alpha, "mu": options.mu,
            "dkl_weights": tuple(options.dkl_weights)}


def one_tokenizer(table: Any) -> bool:
    """Whether ``table`` pairs a tokenizer with itself (same fingerprint on both sides): every id is then its own
    partner, rather than, say, a byte-fallback piece's regular twin."""
    fingerprint = getattr(table, "teacher_fingerprint", None)
    return fingerprint is not None and fingerprint == getattr(table, "student_fingerprint", None)


def teacher_top(block: Block, k: int) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """The teacher's top-``k`` per row: ``(log-probs (c, Vt) or None for a cached teacher, values (c, k'),
    ids (c, k'))`` with ``k' = min(k, width)``; a cached teacher's empty or ruled-out slots get id -1."""
    if block.teacher_logits is not None:
        t_lp = torch.log_softmax(scaled(block.teacher_logits, block.temperature), -1)
        top = t_lp.topk(min(k, t_lp.shape[-1]), -1)
        return t_lp, top.values, top.indices
    ids, logp = block.teacher_topk_ids, block.teacher_topk_logp
    top = logp.topk(min(k, logp.shape[-1]), -1)
    return None, top.values, ids.gather(1, top.indices).masked_fill(top.values == float("-inf"), -1)


def scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / T`` (no copy at ``T = 1``)."""
    return logits if temperature == 1.0 else logits / temperature


def teacher_logp(block: Block) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Teacher log-probabilities ``(c, Vt)`` and, for a top-k teacher, the ``(c, Vt)`` mask of its known columns.

    A top-k teacher is densified: unknown columns get :data:`LOG_FLOOR` (probability 0); empty slots (negative
    ids) land in a spare column that is cut off.
    """
    if block.teacher_logits is not None:
        return torch.log_softmax(scaled(block.teacher_logits, block.temperature), -1), None
    ids, logp = block.teacher_topk_ids, block.teacher_topk_logp
    if ids is None or logp is None:
        raise ValueError("a block needs teacher logits or a teacher top-k")
    c, v = ids.shape[0], block.teacher_vocab_size
    slot = ids.masked_fill(ids < 0, v)
    dense = logp.new_full((c, v + 1), LOG_FLOOR).scatter_(1, slot, logp)[:, :v]
    known = torch.zeros(c, v + 1, dtype=torch.bool, device=ids.device).scatter_(1, slot, True)[:, :v]
    return dense, known


class _Log(torch.autograd.Function):
    """``log(x)`` for ``x >= 0`` (0 gives ``-inf``) whose gradient at ``x = 0`` is 0 rather than NaN or inf."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return torch.log(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return (grad / x).masked_fill_(x == 0, 0.0)  # in place: one (c, V) temporary, as the plain log has


def safe_log(x: torch.Tensor) -> torch.Tensor:
    """``log(x)`` for ``x >= 0`` with a zero (not NaN / inf) gradient where ``x = 0``."""
    return _Log.apply(x)


def log_normalised(x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """``log(x / sum(x))`` per row for non-negative ``x`` (exact: a 0 gives ``-inf``); with ``valid``, only over valid
    columns (others floored). A row summing to 0 gives ``-inf`` (or the floor) everywhere, never NaN."""
    if valid is not None:
        x = x * valid
    total = x.sum(-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    logx = _Log.apply(x) - torch.log(total)
    return logx if valid is None else torch.where(valid, logx, logx.new_tensor(LOG_FLOOR))


def merged_probs(logp: torch.Tensor, factor: torch.Tensor | None) -> torch.Tensor:
    """``exp(logp + factor)``: a row's probabilities times its chunk's merge factor (none: plain probabilities)."""
    return (logp if factor is None else logp + factor[:, None]).exp()
