"""Divergences between two distributions on the same support: one call shape for all of them.

Every function here takes ``(teacher_logp, student_logp, *, knobs...)``: two ``(N, V)`` tensors of
log-probabilities over the same ``V`` columns, and returns ``(N,)`` per-row values. Write ``p = exp(teacher_logp)``
(teacher) and ``q = exp(student_logp)`` (student). They are swappable: :func:`divergence` dispatches on a name.

Support: a column outside a distribution's support carries a *finite* floor log-probability (:data:`LOG_FLOOR`,
``exp`` of it is exactly 0 in fp32 and fp64), never ``-inf``, so ``0 * log 0`` terms are 0 and their gradients are 0
rather than NaN. Rows need not sum to 1 (GOLD's merged chunk distributions do not); the formulas are applied as
written. Inputs are used in their own dtype: the loss engine hands fp32 (fp64 for fp64 logits).

Which to choose: forward KL is mode-covering and the usual KD default; reverse KL is mode-seeking (on-policy
distillation, MiniLLM); JSD(beta) and TVD are bounded and robust to disjoint supports; skew KL / skew reverse KL
(DistiLLM, alpha=0.1) keep a mixture in the log so they never blow up; AKL (Wu et al., 2024) adapts the
forward/reverse mix to where the two distributions differ; symmetric KL is forward plus reverse.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal, get_args

import torch

__all__ = [
    "DivergenceName",
    "DIVERGENCES",
    "LOG_FLOOR",
    "akl",
    "check_option",
    "divergence",
    "fkl",
    "jsd",
    "reduce_rows",
    "rkl",
    "skl",
    "srkl",
    "symmetric_kl",
    "token_kd_loss",
    "tvd",
]

DivergenceName = Literal["fkl", "rkl", "jsd", "tvd", "skl", "srkl", "akl", "symmetric_kl"]
Reduction = Literal["mean", "sum", "none"]

#: Log-probability given to columns outside a distribution's support: finite, and ``exp`` of it is exactly 0.
LOG_FLOOR = -1.0e4


def check_option(name: str, value: Any, allowed: Any) -> None:
    """Raise ``ValueError`` naming the allowed values when ``value`` is not one of them (``allowed``: a Literal)."""
    options = get_args(allowed) or tuple(allowed)
    if value not in options:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {', '.join(map(repr, options))}")


def _kl_terms(a_logp: torch.Tensor, b_logp: torch.Tensor) -> torch.Tensor:
    """Elementwise ``a * (log a - log b)``: zero where ``a`` is 0 (one fused kernel)."""
    return torch.nn.functional.kl_div(b_logp, a_logp, reduction="none", log_target=True)


def fkl(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """Forward KL, ``KL(p || q) = sum_v p_v (log p_v - log q_v)``. ``(N, V), (N, V) -> (N,)``."""
    return _kl_terms(teacher_logp, student_logp).sum(-1)


def rkl(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """Reverse KL, ``KL(q || p) = sum_v q_v (log q_v - log p_v)``. ``(N, V), (N, V) -> (N,)``."""
    return _kl_terms(student_logp, teacher_logp).sum(-1)


def symmetric_kl(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """Symmetric KL, ``KL(p || q) + KL(q || p)``. ``(N, V), (N, V) -> (N,)``."""
    return (_kl_terms(teacher_logp, student_logp) + _kl_terms(student_logp, teacher_logp)).sum(-1)


def jsd(teacher_logp: torch.Tensor, student_logp: torch.Tensor, *, beta: float = 0.5) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence (GKD, Agarwal et al. 2024, eq. 1).

    ``m = beta * p + (1 - beta) * q``;  ``JSD_beta = beta * KL(p || m) + (1 - beta) * KL(q || m)``.

    At the end points the weighted sum degenerates to 0, so, as in the GKD reference code, ``beta = 0`` is forward
    KL ``KL(p || q)`` and ``beta = 1`` is reverse KL ``KL(q || p)``. ``(N, V), (N, V) -> (N,)``.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    if beta == 0.0:
        return fkl(teacher_logp, student_logp)
    if beta == 1.0:
        return rkl(teacher_logp, student_logp)
    mix = torch.logaddexp(teacher_logp + math.log(beta), student_logp + math.log1p(-beta))
    return (beta * _kl_terms(teacher_logp, mix) + (1.0 - beta) * _kl_terms(student_logp, mix)).sum(-1)


def tvd(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """Total variation distance, ``0.5 * sum_v |p_v - q_v|``. ``(N, V), (N, V) -> (N,)``."""
    return 0.5 * (teacher_logp.exp() - student_logp.exp()).abs().sum(-1)


def skl(teacher_logp: torch.Tensor, student_logp: torch.Tensor, *, alpha: float = 0.1) -> torch.Tensor:
    """Skew KL (DistiLLM), ``KL(p || alpha * p + (1 - alpha) * q)``; ``alpha = 0`` is forward KL.

    ``(N, V), (N, V) -> (N,)``. Finite even where ``q`` is 0, for ``alpha > 0``.
    """
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must lie in [0, 1), got {alpha}")
    if alpha == 0.0:
        return fkl(teacher_logp, student_logp)
    mix = torch.logaddexp(teacher_logp + math.log(alpha), student_logp + math.log1p(-alpha))
    return _kl_terms(teacher_logp, mix).sum(-1)


def srkl(teacher_logp: torch.Tensor, student_logp: torch.Tensor, *, alpha: float = 0.1) -> torch.Tensor:
    """Skew reverse KL (DistiLLM), ``KL(q || alpha * q + (1 - alpha) * p)``; ``alpha = 0`` is reverse KL.

    ``(N, V), (N, V) -> (N,)``.
    """
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must lie in [0, 1), got {alpha}")
    if alpha == 0.0:
        return rkl(teacher_logp, student_logp)
    mix = torch.logaddexp(student_logp + math.log(alpha), teacher_logp + math.log1p(-alpha))
    return _kl_terms(student_logp, mix).sum(-1)


def _head_mask(p: torch.Tensor, mu: float) -> torch.Tensor:
    """``(N, V)`` bool: the teacher's head, the highest-probability prefix whose cumulative mass reaches ``mu``.

    Column ``v`` is in the head when the mass of the columns ranked strictly before it is below ``mu``. The rank is
    found with a top-k of 256 columns; rows whose head is longer fall back to a full sort (rare: mu=0.5 is usually
    reached within a few tokens).
    """
    n, v = p.shape
    k = min(v, 256)
    vals, idx = torch.topk(p, k, dim=-1)
    before = torch.cumsum(vals, -1) - vals
    head = torch.zeros_like(p, dtype=torch.bool).scatter_(1, idx, before < mu)
    long_rows = (before[:, -1] + vals[:, -1] < mu).nonzero().flatten() if k < v else p.new_zeros(0, dtype=torch.long)
    if long_rows.numel():
        vals, idx = torch.sort(p[long_rows], dim=-1, descending=True)
        before = torch.cumsum(vals, -1) - vals
        head[long_rows] = torch.zeros_like(vals, dtype=torch.bool).scatter_(1, idx, before < mu)
    return head


def akl(teacher_logp: torch.Tensor, student_logp: torch.Tensor, *, mu: float = 0.5) -> torch.Tensor:
    """Adaptive KL (Wu et al., 2024, "Rethinking Kullback-Leibler Divergence in Knowledge Distillation for LLMs").

    Sort the teacher's probabilities; the *head* H is the prefix whose cumulative mass reaches ``mu``, the *tail* T the
    rest. With ``g_H = sum_{v in H} |p_v - q_v|`` and ``g_T = sum_{v in T} |p_v - q_v|``:

    ``AKL = g_H / (g_H + g_T) * KL(p || q) + g_T / (g_H + g_T) * KL(q || p)``  (0 where ``p == q``).

    The weights are differentiated through, as in the paper's code. ``(N, V), (N, V) -> (N,)``.
    """
    if not 0.0 < mu <= 1.0:
        raise ValueError(f"mu must lie in (0, 1], got {mu}")
    p = teacher_logp.exp()
    gap = (p - student_logp.exp()).abs()
    head = _head_mask(p.detach(), mu)
    g_head = (gap * head).sum(-1)
    g_all = gap.sum(-1)
    denom = g_all.clamp_min(torch.finfo(g_all.dtype).tiny)
    w_head = g_head / denom
    w_tail = (g_all - g_head) / denom
    return w_head * fkl(teacher_logp, student_logp) + w_tail * rkl(teacher_logp, student_logp)


DIVERGENCES: dict[str, Callable[..., torch.Tensor]] = {
    "fkl": fkl,
    "rkl": rkl,
    "jsd": jsd,
    "tvd": tvd,
    "skl": skl,
    "srkl": srkl,
    "akl": akl,
    "symmetric_kl": symmetric_kl,
}


def divergence(
    teacher_logp: torch.Tensor,
    student_logp: torch.Tensor,
    *,
    kind: DivergenceName = "fkl",
    beta: float = 0.5,
    alpha: float = 0.1,
    mu: float = 0.5,
) -> torch.Tensor:
    """Per-row divergence ``kind`` between teacher and student log-probabilities (same support).

    Args:
        teacher_logp / student_logp: ``(N, V)`` log-probabilities; columns outside a support hold :data:`LOG_FLOOR`.
        kind: one of ``fkl, rkl, jsd, tvd, skl, srkl, akl, symmetric_kl``.
        beta: JSD weight; alpha: skew of ``skl``/``srkl``; mu: AKL head mass. Ignored by the others.

    Returns:
        ``(N,)`` values in the inputs' dtype.
    """
    check_option("divergence", kind, DivergenceName)
    if teacher_logp.shape != student_logp.shape:
        raise ValueError(
            f"teacher_logp {tuple(teacher_logp.shape)} and student_logp {tuple(student_logp.shape)} must have the "
            "same shape (the same support)"
        )
    if kind == "jsd":
        return jsd(teacher_logp, student_logp, beta=beta)
    if kind in ("skl", "srkl"):
        return DIVERGENCES[kind](teacher_logp, student_logp, alpha=alpha)
    if kind == "akl":
        return akl(teacher_logp, student_logp, mu=mu)
    return DIVERGENCES[kind](teacher_logp, student_logp)


def reduce_rows(
    values: torch.Tensor,
    *,
    reduction: Reduction = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce ``(N,)`` per-row values: ``mean`` (sum / N, or sum / ``num_items_in_batch`` when given, which keeps
    gradient accumulation exact), ``sum``, or ``none`` (the ``(N,)`` values). An empty ``values`` gives 0."""
    check_option("reduction", reduction, Reduction)
    if reduction == "none":
        return values
    total = values.sum()
    if reduction == "sum":
        return total
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    return total / max(values.shape[0], 1)


def token_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    divergence_name: DivergenceName = "fkl",
    temperature: float = 1.0,
    scale_by_temperature_sq: bool = True,
    reduction: Reduction = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
    beta: float = 0.5,
    alpha: float = 0.1,
    mu: float = 0.5,
) -> torch.Tensor:
    """Plain token-level KD for models sharing one tokenizer (materialises ``(N, V)``; the same-vocabulary baseline).

    ``loss_i = T^2 * D(softmax(t_i / T), softmax(s_i / T))`` over rows ``i`` where ``mask`` is True.

    Args:
        student_logits / teacher_logits: ``(..., V)`` logits, same shape; any float dtype (math in fp32, or fp64).
        mask: ``(...)`` bool rows to keep (all when None).
        divergence_name: see :func:`divergence`; temperature ``T > 0``; ``scale_by_temperature_sq`` multiplies by ``T^2``.
        reduction / num_items_in_batch: see :func:`reduce_rows`.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"logit shapes differ: student {tuple(student_logits.shape)}, teacher {tuple(teacher_logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    s = student_logits.reshape(-1, student_logits.shape[-1]).to(dtype)
    t = teacher_logits.reshape(-1, teacher_logits.shape[-1]).to(dtype)
    if mask is not None:
        keep = mask.reshape(-1).bool()
        s, t = s[keep], t[keep]
    values = divergence(
        torch.log_softmax(t / temperature, -1), torch.log_softmax(s / temperature, -1),
        kind=divergence_name, beta=beta, alpha=alpha, mu=mu,
    )
    if scale_by_temperature_sq:
        values = values * temperature**2
    return reduce_rows(values, reduction=reduction, num_items_in_batch=num_items_in_batch)
