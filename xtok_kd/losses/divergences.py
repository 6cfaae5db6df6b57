"""Divergences between two distributions on the same support: one call shape for all of them.

Every function here takes ``(teacher_logp, student_logp, *, knobs...)``: two ``(N, V)`` tensors of
log-probabilities over the same ``V`` columns, and returns ``(N,)`` per-row values. Write ``p = exp(teacher_logp)``
(teacher) and ``q = exp(student_logp)`` (student). They are swappable: :func:`divergence` dispatches on a name.

Zeros: a log-probability of ``-inf`` (a ruled-out token, e.g. a banned token's ``-inf`` logit) is probability 0,
accepted on either side, and ``0 * log 0 = 0``: no NaN in values or gradients. Columns outside a support may also
carry the finite floor :data:`LOG_FLOOR` (``exp`` of it is exactly 0 in fp32 and fp64). Where the mathematics is
infinite the value is ``+inf``: forward KL where ``q = 0 < p``, reverse KL where ``p = 0 < q``, hence symmetric KL,
AKL when the infinite side has a positive weight, and DKL where ``q = 0 < p``. Such a row's infinite terms are
constants: they contribute nothing to the gradient, which stays finite (the loss engine gives an infinite chunk no
gradient at all). JSD, TVD and skew KL / skew reverse KL with ``alpha > 0`` are always finite. The common all-finite
case takes one fused kernel; rows with zeros are recomputed on a masked path only when the fast value is not finite.
NaN inputs give NaN.

Rows need not sum to 1 (GOLD's merged chunk distributions do not); the formulas are applied as written. Inputs are
used in their own dtype: the loss engine hands fp32 (fp64 for fp64 logits).

Which to choose: forward KL is mode-covering and the usual KD default; reverse KL is mode-seeking (on-policy
distillation, MiniLLM); JSD(beta) and TVD are bounded and robust to disjoint supports; skew KL / skew reverse KL
(DistiLLM, alpha=0.1) keep a mixture in the log so they never blow up; AKL (Wu et al., 2024) adapts the
forward/reverse mix to where the two distributions differ; symmetric KL is forward plus reverse; decoupled KL (DKL,
Cui et al., 2024) is forward KL at its default ``dkl_weights=(0, 1)`` and, with a positive first weight, adds a
teacher-weighted MSE of pairwise log-probability gaps that pulls the student's whole log-ratio profile into line.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Literal, get_args

import torch

__all__ = [
    "DivergenceName",
    "DIVERGENCES",
    "LOG_FLOOR",
    "akl",
    "check_dkl_weights",
    "check_num_items",
    "check_option",
    "check_temperature",
    "divergence",
    "dkl",
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

DivergenceName = Literal["fkl", "rkl", "jsd", "tvd", "skl", "srkl", "akl", "symmetric_kl", "dkl"]
Reduction = Literal["mean", "sum", "none"]

#: Log-probability given to columns outside a distribution's support: finite, and ``exp`` of it is exactly 0.
LOG_FLOOR = -1.0e4


def check_option(name: str, value: Any, allowed: Any) -> None:
    """Raise ``ValueError`` naming the allowed values when ``value`` is not one of them (``allowed``: a Literal)."""
    options = get_args(allowed) or tuple(allowed)
    if value not in options:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {', '.join(map(repr, options))}")


def check_temperature(temperature: Any) -> float:
    """``temperature`` as a float; ``ValueError`` naming the value unless it is a finite real number > 0."""
    ok = isinstance(temperature, numbers.Real) and not isinstance(temperature, bool)
    if ok and math.isfinite(float(temperature)) and float(temperature) > 0:
        return float(temperature)
    raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def _finite(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x).all())


def _kl_terms_safe(a_logp: torch.Tensor, b_logp: torch.Tensor) -> torch.Tensor:
    """Elementwise ``a * (log a - log b)`` with ``-inf`` entries: 0 where ``a = 0``, ``+inf`` where ``a > 0 = b``.

    Masked before the arithmetic (never ``0 * inf``), so the gradient is finite everywhere; the ``+inf`` entries are
    constants."""
    a_zero = a_logp <= LOG_FLOOR  # -inf, or the floor that marks a column outside the support: probability 0
    b_zero = b_logp == float("-inf")
    terms = a_logp.exp() * (a_logp.masked_fill(a_zero, 0.0) - b_logp.masked_fill(b_zero, 0.0))
    return terms.masked_fill(a_zero, 0.0).masked_fill(b_zero & ~a_zero, float("inf"))


def _kl_rows(a_logp: torch.Tensor, b_logp: torch.Tensor) -> torch.Tensor:
    """``sum_v a_v (log a_v - log b_v)`` per row: one fused kernel, or the masked form when that is not finite."""
    out = torch.nn.functional.kl_div(b_logp, a_logp, reduction="none", log_target=True).sum(-1)
    return out if _finite(out) else _kl_terms_safe(a_logp, b_logp).sum(-1)


def _log_mix(a_logp: torch.Tensor, w_a: float, b_logp: torch.Tensor, w_b: float) -> torch.Tensor:
    """``log(w_a * a + w_b * b)``; a column where both are 0 stays ``-inf`` with a zero (not NaN) gradient."""
    x, y = a_logp + math.log(w_a), b_logp + math.log(w_b)
    both = (a_logp == float("-inf")) & (b_logp == float("-inf"))
    if not bool(both.any()):
        return torch.logaddexp(x, y)
    return torch.logaddexp(x.masked_fill(both, 0.0), y.masked_fill(both, 0.0)).masked_fill(both, float("-inf"))


def fkl(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """Forward KL, ``KL(p || q) = sum_v p_v (log p_v - log q_v)``. ``(N, V), (N, V) -> (N,)``; ``+inf`` where
    ``q_v = 0 < p_v``."""
    return _kl_rows(teacher_logp, student_logp)


def rkl(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """Reverse KL, ``KL(q || p) = sum_v q_v (log q_v - log p_v)``. ``(N, V), (N, V) -> (N,)``; ``+inf`` where
    ``p_v = 0 < q_v``."""
    return _kl_rows(student_logp, teacher_logp)


def symmetric_kl(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """Symmetric KL, ``KL(p || q) + KL(q || p)``. ``(N, V), (N, V) -> (N,)``."""
    return _kl_rows(teacher_logp, student_logp) + _kl_rows(student_logp, teacher_logp)


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
    kl = torch.nn.functional.kl_div
    out = (beta * kl(mix, teacher_logp, reduction="none", log_target=True)
           + (1.0 - beta) * kl(mix, student_logp, reduction="none", log_target=True)).sum(-1)
    if _finite(out):
        return out
    mix = _log_mix(teacher_logp, beta, student_logp, 1.0 - beta)
    return (beta * _kl_terms_safe(teacher_logp, mix) + (1.0 - beta) * _kl_terms_safe(student_logp, mix)).sum(-1)


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
    out = torch.nn.functional.kl_div(mix, teacher_logp, reduction="none", log_target=True).sum(-1)
    if _finite(out):
        return out
    return _kl_terms_safe(teacher_logp, _log_mix(teacher_logp, alpha, student_logp, 1.0 - alpha)).sum(-1)


def srkl(teacher_logp: torch.Tensor, student_logp: torch.Tensor, *, alpha: float = 0.1) -> torch.Tensor:
    """Skew reverse KL (DistiLLM), ``KL(q || alpha * q + (1 - alpha) * p)``; ``alpha = 0`` is reverse KL.

    ``(N, V), (N, V) -> (N,)``. Finite even where ``p`` is 0, for ``alpha > 0``.
    """
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must lie in [0, 1), got {alpha}")
    if alpha == 0.0:
        return rkl(teacher_logp, student_logp)
    mix = torch.logaddexp(student_logp + math.log(alpha), teacher_logp + math.log1p(-alpha))
    out = torch.nn.functional.kl_div(mix, student_logp, reduction="none", log_target=True).sum(-1)
    if _finite(out):
        return out
    return _kl_terms_safe(student_logp, _log_mix(student_logp, alpha, teacher_logp, 1.0 - alpha)).sum(-1)


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

    The weights are differentiated through, as in the paper's code. ``(N, V), (N, V) -> (N,)``; ``+inf`` when a KL
    side with a positive weight is infinite.
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
    forward, reverse = fkl(teacher_logp, student_logp), rkl(teacher_logp, student_logp)
    out = w_head * forward + w_tail * reverse
    if _finite(out):
        return out
    # An infinite side: +inf where its weight is positive, else absent (0 * inf is 0 here); no inf * 0 in the
    # gradient of the weights.
    inf_f, inf_r = torch.isinf(forward), torch.isinf(reverse)
    out = w_head * forward.masked_fill(inf_f, 0.0) + w_tail * reverse.masked_fill(inf_r, 0.0)
    return out.masked_fill((inf_f & (w_head > 0)) | (inf_r & (w_tail > 0)), float("inf"))


def check_dkl_weights(dkl_weights: Any) -> tuple[float, float]:
    """``dkl_weights`` as ``(wmse, ce)`` floats; ``ValueError`` naming the value unless it is two finite real
    numbers >= 0, not both 0."""
    ok = isinstance(dkl_weights, (tuple, list)) and len(dkl_weights) == 2
    if not ok:
        raise ValueError(f"dkl_weights must be a pair (wmse_weight, ce_weight), got {dkl_weights!r}")
    for name, w in zip(("wmse_weight", "ce_weight"), dkl_weights):
        real = isinstance(w, numbers.Real) and not isinstance(w, bool)
        if not (real and math.isfinite(float(w)) and float(w) >= 0):
            raise ValueError(
                f"dkl_weights {name} must be a finite number >= 0, got {w!r} in dkl_weights={dkl_weights!r}"
            )
    wmse, ce = float(dkl_weights[0]), float(dkl_weights[1])
    if wmse == 0.0 and ce == 0.0:
        raise ValueError(f"dkl_weights must not both be 0 (the loss would be identically 0), got {dkl_weights!r}")
    return wmse, ce


def _weighted_pair_mse(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """``1/4 sum_{j,k} S(p_j p_k) (d_j - d_k)^2`` per row with ``d = teacher_logp - student_logp``, in O(V).

    Expanded: ``1/2 [(sum_j w_j)(sum_j w_j e_j^2) - (sum_j w_j e_j)^2]`` with ``w = S(p)`` and ``e = d - c``. The
    expression is exactly invariant to the shift ``c``, so ``c`` is the detached weighted mean of ``d``: that keeps
    the two sums from cancelling catastrophically (``d`` is ~1e4 on a :data:`LOG_FLOOR` column the teacher uses) and
    changes neither the value nor the gradient. Columns with ``p = 0`` (``-inf`` or the floor) have weight 0 and drop
    out; a column with ``q = 0 < p`` makes the row ``+inf``, a constant added to the finite part (whose gradient is
    kept, as the KL rows keep theirs).
    """
    w = teacher_logp.detach().exp()
    d = teacher_logp - student_logp
    total = w.sum(-1, keepdim=True)
    tiny = torch.finfo(w.dtype).tiny
    c = ((w * d).sum(-1, keepdim=True) / total.clamp_min(tiny)).detach()
    e = d - c
    out = 0.5 * (total[:, 0] * (w * e * e).sum(-1) - (w * e).sum(-1) ** 2)
    if _finite(out):
        return out
    p_zero = w == 0
    q_zero = student_logp == float("-inf")
    drop = p_zero | q_zero
    w = w.masked_fill(drop, 0.0)
    d = teacher_logp.masked_fill(drop, 0.0) - student_logp.masked_fill(drop, 0.0)
    total = w.sum(-1, keepdim=True)
    c = ((w * d).sum(-1, keepdim=True) / total.clamp_min(tiny)).detach()
    e = d - c
    out = 0.5 * (total[:, 0] * (w * e * e).sum(-1) - (w * e).sum(-1) ** 2)
    infinite = (q_zero & ~p_zero).any(-1)
    return out + torch.zeros_like(out).masked_fill(infinite, float("inf"))


def dkl(
    teacher_logp: torch.Tensor,
    student_logp: torch.Tensor,
    *,
    dkl_weights: tuple[float, float] = (0.0, 1.0),
) -> torch.Tensor:
    """Decoupled KL (Cui et al., NeurIPS 2024, "Decoupled Kullback-Leibler Divergence Loss"). ``(N, V), (N, V) ->
    (N,)``.

    With ``t = teacher_logp``, ``s = student_logp``, ``p = exp(t)``, ``S`` = stop-gradient (detach) and
    ``(alpha, beta) = dkl_weights`` (the paper's names; ``alpha`` weighs the wMSE, ``beta`` the cross-entropy)::

        DKL = alpha * 1/4 * sum_{j,k} S(p_j p_k) ((t_j - t_k) - (s_j - s_k))^2      (wMSE of pairwise gaps)
            + beta  * sum_j S(p_j) (S(t_j) - s_j)                                   (soft-label CE - teacher entropy)

    computed in O(V) per row (the pairwise sum expanded, never a ``V x V`` tensor). Differences of log-probabilities
    are differences of logits, so the first term is the paper's wMSE on logits. The second is the paper's soft-label
    cross-entropy ``-sum_j S(p_j) s_j`` plus the teacher's entropy, a constant: its gradient is the cross-entropy's and
    its value is ``KL(p || q)``.

    Relation to the paper: the paper proves *gradient* equivalence only, ``grad KL == grad DKL`` at ``alpha = beta =
    1`` with the student's gaps in the wMSE detached (``S(s_j - s_k)``): the wMSE then feeds only the teacher's logits
    and the cross-entropy only the student's; its DKL *value* is not KL's (it adds the wMSE and the teacher's entropy).
    With a frozen teacher (distillation) that wMSE is inert, the asymmetry the paper points out; its IKL therefore
    lets the gradient reach the student's gaps, as here. So here the KL-equivalent setting is ``dkl_weights = (0, 1)``
    (the default): it equals :func:`fkl` exactly in value and in the student's gradient (the same kernel, teacher
    detached). With ``alpha > 0`` the student also gets the wMSE's gradient, ``-alpha * p_v (e_v - E_p[e])`` w.r.t.
    its logits (``e = t - s``, rows summing to 1), and the teacher's logits get ``alpha`` times forward KL's teacher
    gradient (the paper's theorem, teacher side); the teacher gets none at ``alpha = 0``. IKL's other change,
    class-wise global weights (teacher probabilities averaged over a class), is not implemented: the weights are the
    row's own teacher probabilities.

    For rows summing to 1 the wMSE is ``1/2 Var_p(t - s) >= 0``, zero exactly where ``q`` is proportional to ``p`` on
    the teacher's support, so DKL >= 0 and is 0 for identical inputs. Unnormalised rows: both sums are applied as
    written (the wMSE stays >= 0; the second term is forward KL's formula, as :func:`fkl`). Zeros: where ``q = 0 < p``
    the value is ``+inf`` with a finite gradient, as forward KL; columns with ``p = 0`` drop out of the wMSE, and of
    the second term exactly as they do of :func:`fkl` (which, note, also gives ``+inf`` for a teacher at
    :data:`LOG_FLOOR` against a student's ``-inf``).

    Args:
        teacher_logp / student_logp: ``(N, V)`` log-probabilities on the same columns.
        dkl_weights: ``(alpha, beta)``, finite, ``>= 0``, not both 0; ``(0, 1)`` is forward KL.
    """
    wmse_weight, ce_weight = check_dkl_weights(dkl_weights)
    parts = []  # at least one: check_dkl_weights rules out (0, 0)
    if ce_weight:
        kl = _kl_rows(teacher_logp.detach(), student_logp)
        parts.append(kl if ce_weight == 1.0 else ce_weight * kl)
    if wmse_weight:
        parts.append(wmse_weight * _weighted_pair_mse(teacher_logp, student_logp))
    return parts[0] if len(parts) == 1 else parts[0] + parts[1]


DIVERGENCES: dict[str, Callable[..., torch.Tensor]] = {
    "fkl": fkl,
    "rkl": rkl,
    "jsd": jsd,
    "tvd": tvd,
    "skl": skl,
    "srkl": srkl,
    "akl": akl,
    "symmetric_kl": symmetric_kl,
    "dkl": dkl,
}


def divergence(
    teacher_logp: torch.Tensor,
    student_logp: torch.Tensor,
    *,
    kind: DivergenceName = "fkl",
    beta: float = 0.5,
    alpha: float = 0.1,
    mu: float = 0.5,
    dkl_weights: tuple[float, float] = (0.0, 1.0),
) -> torch.Tensor:
    """Per-row divergence ``kind`` between teacher and student log-probabilities (same support).

    Args:
        teacher_logp / student_logp: ``(N, V)`` log-probabilities; columns outside a support hold :data:`LOG_FLOOR`.
        kind: one of ``fkl, rkl, jsd, tvd, skl, srkl, akl, symmetric_kl, dkl``.
        beta: JSD weight; alpha: skew of ``skl``/``srkl``; mu: AKL head mass; dkl_weights: DKL's ``(wmse, ce)``
            weights (``(0, 1)`` is forward KL; validated whatever ``kind``). Ignored by the others.

    Returns:
        ``(N,)`` values in the inputs' dtype.
    """
    check_option("divergence", kind, DivergenceName)
    dkl_weights = check_dkl_weights(dkl_weights)
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
    if kind == "dkl":
        return dkl(teacher_logp, student_logp, dkl_weights=dkl_weights)
    return DIVERGENCES[kind](teacher_logp, student_logp)


def check_num_items(num_items_in_batch: Any) -> int | None:
    """``num_items_in_batch`` as an int (None stays None); ``ValueError`` naming the value unless it is a whole
    number >= 1: a Python/NumPy number or a one-element tensor (as ``transformers`` passes it)."""
    if num_items_in_batch is None:
        return None
    value: Any = num_items_in_batch
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
            raise ValueError(f"num_items_in_batch must be a number or a one-element real tensor, got a {value.dtype} "
                             f"tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"num_items_in_batch must be a whole number >= 1, got {num_items_in_batch!r}")
    if not (math.isfinite(float(value)) and float(value) >= 1 and float(value).is_integer()):
        raise ValueError(f"num_items_in_batch must be a whole number >= 1 (the count of items the summed loss is "
                         f"divided by), got {num_items_in_batch!r}")
    return int(value)


def reduce_rows(
    values: torch.Tensor,
    *,
    reduction: Reduction = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce ``(N,)`` per-row values: ``mean`` (sum / N, or sum / ``num_items_in_batch`` when given, which keeps
    gradient accumulation exact), ``sum``, or ``none`` (the ``(N,)`` values). An empty ``values`` gives 0.

    ``num_items_in_batch``: a whole number >= 1 (int, or a one-element tensor); anything else (0, negative, NaN,
    2.5, a bool) raises ``ValueError`` naming it. It is validated for every reduction and used by ``mean`` only."""
    check_option("reduction", reduction, Reduction)
    count = check_num_items(num_items_in_batch)
    if reduction == "none":
        return values
    total = values.sum()
    if reduction == "sum":
        return total
    if count is not None:
        return total / count
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
    dkl_weights: tuple[float, float] = (0.0, 1.0),
) -> torch.Tensor:
    """Plain token-level KD for models sharing one tokenizer (materialises ``(N, V)``; the same-vocabulary baseline).

    ``loss_i = T^2 * D(softmax(t_i / T), softmax(s_i / T))`` over rows ``i`` where ``mask`` is True.

    Args:
        student_logits / teacher_logits: ``(..., V)`` logits, same shape; any float dtype (math in fp32, or fp64).
            ``-inf`` is a ruled-out token (see the module notes); NaN, ``+inf`` or a row of ``-inf`` only raise.
        mask: ``(...)`` bool rows to keep (all when None).
        divergence_name: see :func:`divergence`; temperature ``T``: finite, ``> 0``; ``scale_by_temperature_sq``
            multiplies by ``T^2``.
        reduction / num_items_in_batch: see :func:`reduce_rows`.
        beta / alpha / mu / dkl_weights: the divergence's knobs, see :func:`divergence`.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"logit shapes differ: student {tuple(student_logits.shape)}, teacher {tuple(teacher_logits.shape)}")
    temperature = check_temperature(temperature)
    check_num_items(num_items_in_batch)
    check_dkl_weights(dkl_weights)
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    s = student_logits.reshape(-1, student_logits.shape[-1]).to(dtype)
    t = teacher_logits.reshape(-1, teacher_logits.shape[-1]).to(dtype)
    if mask is not None:
        keep = mask.reshape(-1).bool()
        s, t = s[keep], t[keep]
    values = divergence(
        torch.log_softmax(t / temperature, -1), torch.log_softmax(s / temperature, -1),
        kind=divergence_name, beta=beta, alpha=alpha, mu=mu, dkl_weights=dkl_weights,
    )
    if bool(torch.isnan(values).any()):
        for name, x in (("teacher", t), ("student", s)):
            bad = torch.isnan(x).any(-1) | (x == float("inf")).any(-1) | (x == float("-inf")).all(-1)
            if bool(bad.any()):
                raise ValueError(f"{name} logits row {int(bad.nonzero()[0])} (of the kept rows) holds NaN or +inf, or "
                                 "is -inf in every column; -inf marks a ruled-out token, but a row needs one finite "
                                 "logit and no NaN / +inf")
    if scale_by_temperature_sq:
        values = values * temperature**2
    return reduce_rows(values, reduction=reduction, num_items_in_batch=num_items_in_batch)
