"""The loss's knobs: one record, their defaults, and every knob's check in one place.

:class:`CrossTokenizerKDLoss` gathers its keyword arguments into :class:`LossOptions`; :func:`option_problems` checks
each knob's type and range and that a mapping-specific knob is only set for a mapping that reads it. A mapping's own
cross-checks (a knob combined with the table, say) live in the mapping's ``problems``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields
from typing import Any, Literal, get_args

from .divergences import DivergenceName, Reduction, check_dkl_weights, check_temperature
from .types import Direction

__all__ = ["MappingName", "Merge", "LossOptions", "OPTION_USERS", "option_problems", "is_count", "is_real"]

MappingName = Literal["projection", "uld", "hybrid", "sinkhorn", "cdm", "alm"]
Merge = Literal["none", "observed", "bayesian"]
Cost = Literal["lexical", "embedding"]
AlmDivergence = Literal["binary_kl", "abs_diff"]
SinkhornSupport = Literal["union", "top_k"]


@dataclass
class LossOptions:
    """Every knob of :class:`~xtok_kd.losses.CrossTokenizerKDLoss` (documented there), with its default."""

    mapping: str = "projection"
    divergence: str = "fkl"
    temperature: float = 1.0
    scale_by_temperature_sq: bool = True
    top_k: int | None = None
    block_rows: int = 32
    merge: str = "none"
    direction: str = "student_to_teacher"
    beta: float = 0.5
    alpha: float = 0.1
    mu: float = 0.5
    reduction: str = "mean"
    matched_pairs: Any = None
    hybrid_weights: Any = None
    hybrid_prob_floor: float = 1e-8
    cost: str = "lexical"
    epsilon: float = 0.1
    sinkhorn_max_iter: int = 300
    sinkhorn_tol: float = 1e-4
    unbiased: bool = False
    teacher_embeddings: Any = None
    cdm_max_distance: float = 0.1
    alm_divergence: str = "binary_kl"
    dkl_weights: Any = (0.0, 1.0)
    sequence_weight: float = 0.0
    sinkhorn_support: str = "top_k"
    teacher_tail: bool = True


#: Knobs that only some mappings read: setting one away from its default for another mapping is an error.
OPTION_USERS: dict[str, tuple[str, ...]] = {
    "top_k": ("uld", "sinkhorn", "cdm"),
    "direction": ("projection",),
    "teacher_tail": ("projection",),
    "matched_pairs": ("hybrid",),
    "hybrid_weights": ("hybrid",),
    "hybrid_prob_floor": ("hybrid",),
    "cost": ("sinkhorn",),
    "epsilon": ("sinkhorn",),
    "sinkhorn_max_iter": ("sinkhorn",),
    "sinkhorn_tol": ("sinkhorn",),
    "unbiased": ("sinkhorn",),
    "teacher_embeddings": ("sinkhorn",),
    "sequence_weight": ("sinkhorn",),
    "sinkhorn_support": ("sinkhorn",),
    "cdm_max_distance": ("cdm",),
    "alm_divergence": ("alm",),
}

#: Mappings that apply ``divergence`` (the others ignore it and its knobs).
DIVERGENCE_USERS = ("projection", "hybrid", "cdm")

_HINTS = {"top_k": "; for projection pass a TeacherTopK as teacher input"}


def is_real(x: Any) -> bool:
    """A real number that is not a bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def is_count(x: Any) -> bool:
    """An integer >= 1 that is not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool) and int(x) >= 1


def _choice(name: str, value: Any, allowed: Any) -> str | None:
    options = get_args(allowed)
    if value in options:
        return None
    return f"{name}={value!r} is not supported; choose one of {', '.join(map(repr, options))}"


def _in(lo: float, hi: float, value: Any, *, lo_open: bool = False, hi_open: bool = False) -> bool:
    if not (is_real(value) and math.isfinite(float(value))):
        return False
    v = float(value)
    return (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)


def _checks(o: LossOptions) -> list[str | None]:
    """One entry per knob: None when it is fine, else the message."""
    def need(ok: bool, message: str) -> str | None:
        return None if ok else message

    try:
        check_temperature(o.temperature)
        temperature = None
    except ValueError as err:
        temperature = str(err)
    w = o.hybrid_weights
    try:
        pair = () if w is None else tuple(w)
    except TypeError:
        pair = ()
    try:
        check_dkl_weights(o.dkl_weights)
        dkl = None
    except ValueError as err:
        dkl = str(err)
    good_pair = len(pair) == 2 and all(is_real(x) and math.isfinite(x) and x >= 0 for x in pair) and sum(pair) > 0
    return [
        _choice("divergence", o.divergence, DivergenceName),
        _choice("merge", o.merge, Merge),
        _choice("direction", o.direction, Direction),
        _choice("reduction", o.reduction, Reduction),
        _choice("cost", o.cost, Cost),
        _choice("alm_divergence", o.alm_divergence, AlmDivergence),
        _choice("sinkhorn_support", o.sinkhorn_support, SinkhornSupport),
        temperature,
        dkl,
        need(isinstance(o.scale_by_temperature_sq, bool),
             f"scale_by_temperature_sq must be True or False, got {o.scale_by_temperature_sq!r}"),
        need(is_count(o.block_rows), f"block_rows must be an int >= 1, got {o.block_rows!r}"),
        need(o.top_k is None or is_count(o.top_k), f"top_k must be None or an int >= 1, got {o.top_k!r}"),
        need(_in(0.0, 1.0, o.beta), f"beta must lie in [0, 1], got {o.beta!r}"),
        need(_in(0.0, 1.0, o.alpha, hi_open=True), f"alpha must lie in [0, 1), got {o.alpha!r}"),
        need(_in(0.0, 1.0, o.mu, lo_open=True), f"mu must lie in (0, 1], got {o.mu!r}"),
        need(_in(0.0, 1.0, o.hybrid_prob_floor, lo_open=True, hi_open=True),
             f"hybrid_prob_floor must lie in (0, 1), got {o.hybrid_prob_floor!r}"),
        need(w is None or good_pair,
             f"hybrid_weights must be (matched, unmatched), two finite numbers >= 0 not both 0, got {w!r}"),
        need(_in(0.0, math.inf, o.epsilon, lo_open=True, hi_open=True),
             f"epsilon must be a finite number > 0 (the entropic regularisation of Sinkhorn; costs lie in [0, 1], "
             f"0.05-0.2 is usual), got {o.epsilon!r}"),
        need(is_count(o.sinkhorn_max_iter), f"sinkhorn_max_iter must be an int >= 1, got {o.sinkhorn_max_iter!r}"),
        need(_in(0.0, math.inf, o.sinkhorn_tol, lo_open=True, hi_open=True),
             f"sinkhorn_tol must be a finite number > 0, got {o.sinkhorn_tol!r}"),
        need(_in(0.0, math.inf, o.sequence_weight, hi_open=True),
             f"sequence_weight must be a finite number >= 0, got {o.sequence_weight!r}"),
        need(isinstance(o.unbiased, bool), f"unbiased must be True or False, got {o.unbiased!r}"),
        need(isinstance(o.teacher_tail, bool), f"teacher_tail must be True or False, got {o.teacher_tail!r}"),
        need(_in(0.0, 1.0, o.cdm_max_distance, hi_open=True),
             f"cdm_max_distance must lie in [0, 1) (a normalised edit distance; 0 keeps exact pairs only), got "
             f"{o.cdm_max_distance!r}"),
    ]


def option_problems(o: LossOptions) -> list[str]:
    """Every problem with the knobs of ``o`` (empty when all are fine), each message naming the value and the fix.

    ``mapping`` itself is checked against the registry (:data:`xtok_kd.losses.mappings.MAPPINGS`) by the module."""
    problems = [p for p in _checks(o) if p is not None]
    defaults = LossOptions()
    for name, users in OPTION_USERS.items():
        value, default = getattr(o, name), getattr(defaults, name)
        if o.mapping in users or value is default or (type(value) is type(default) and value == default):
            continue
        names = [repr(u) for u in users]
        listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
        problems.append(f"{name} applies to mapping={listed} only (got mapping={o.mapping!r}){_HINTS.get(name, '')}")
    if tuple(o.dkl_weights) != tuple(defaults.dkl_weights) and o.divergence != "dkl":
        problems.append(f"dkl_weights applies to divergence='dkl' only (got divergence={o.divergence!r})")
    if o.merge != "none" and o.mapping in ("projection", "sinkhorn", "cdm", "alm"):
        why = ("the projected rows are renormalised, which cancels a merge factor" if o.mapping == "projection"
               else "alm compares whole-chunk likelihoods by itself" if o.mapping == "alm"
               else "it compares the aligned rows' top-k")
        problems.append(f"merge must be 'none' with mapping={o.mapping!r} ({why})")
    return problems


def option_names() -> tuple[str, ...]:
    """The knob names, in declaration order."""
    return tuple(f.name for f in fields(LossOptions))
