"""Building the arrays of a :class:`~xtok_kd.vocab.table.VocabAlignment`: every method, both directions."""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Any

import numpy as np

from ..tokenizer import TokenizerView
from .exact import exact_pairs, exact_partner
from .fuzzy import nearest_neighbours, similarity, token_strings
from .projection import Projection, project
from .specials import partners, special_pairs
from .table import half_up

__all__ = ["build_arrays"]

DIRECTIONS = (("t2s", "teacher", "student"), ("s2t", "student", "teacher"))


def _neighbours(
    source: TokenizerView, target: TokenizerView, *, matched: np.ndarray, k: int, window: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(Vs, k)`` neighbours of the source tokens that have no exact match (other rows: -1 / 0), scores rounded up
    to the float16 grid (:func:`.table.half_up`) so that the table in memory equals its file."""
    vs = source.vocab_size
    ids = np.full((vs, k), -1, dtype=np.int64)
    scores = np.zeros((vs, k), dtype=np.float32)
    lengths = source.token_lengths
    query = np.ones(vs, dtype=bool)
    query[matched] = False
    query[list(source.special_ids)] = False
    query &= lengths > 0
    rows = np.flatnonzero(query)
    src = token_strings(source.all_token_bytes())
    tgt = token_strings(target.all_token_bytes())
    for sid in target.special_ids:
        tgt[sid] = ""  # never a candidate
    found, sim = nearest_neighbours([src[i] for i in rows.tolist()], tgt, k=k, window=window)
    ids[rows] = found
    scores[rows] = half_up(sim)
    return ids, scores


def _token_lengths(view: TokenizerView) -> np.ndarray:
    """``(V,)`` int64 canonical byte length of each id, 0 for special tokens."""
    lengths = view.token_lengths.copy()
    lengths[list(view.special_ids)] = 0
    return lengths


def _projection_stats(prefix: str, proj: Projection, source: TokenizerView) -> dict[str, float]:
    regular = np.ones(source.vocab_size, dtype=bool)
    regular[list(source.special_ids)] = False
    counts = np.diff(proj.offsets)[regular]
    mapped = counts > 0
    return {
        f"{prefix}_mapped_share": float(mapped.mean()) if counts.size else 0.0,
        f"{prefix}_single_piece_share": float((counts == 1).mean()) if counts.size else 0.0,
        f"{prefix}_mean_pieces": float(counts[mapped].mean()) if mapped.any() else 0.0,
        f"{prefix}_fallback_splits": float(proj.fallback),
        f"{prefix}_undecomposable": float(proj.undecomposable),
        f"{prefix}_mapped_specials": float((proj.first[list(source.special_ids)] >= 0).sum()),
    }


def build_arrays(
    teacher: TokenizerView, student: TokenizerView, *, neighbours: int, window: int, progress: bool
) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, float]]:
    """All arrays of a table, its metadata pieces and per-stage timings.

    Returns:
        ``(arrays, info, timings)``: arrays named as the :class:`VocabAlignment` tensors (int64 / float32 numpy);
        ``info`` holds ``stats`` and ``special_roles``; ``timings`` seconds per stage.
    """
    views = {"teacher": teacher, "student": student}
    bar: Any = nullcontext()
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=7, desc="align vocabularies", unit="stage", postfix="vocabularies")
    timings: dict[str, float] = {}
    arrays: dict[str, np.ndarray] = {}
    stats: dict[str, float] = {}

    names = ["vocabularies", "exact", "specials", "projection t2s", "projection s2t", "neighbours t2s",
             "neighbours s2t"]

    def stage(name: str) -> None:
        timings[name] = time.perf_counter() - clock[0]
        clock[0] = time.perf_counter()
        if progress:
            following = names.index(name) + 1
            bar.set_postfix_str(names[following] if following < len(names) else "done")
            bar.update(1)

    clock = [time.perf_counter()]
    with bar:
        teacher.all_token_bytes(), student.all_token_bytes(), teacher.special_ids, student.special_ids
        arrays["teacher_token_lengths"], arrays["student_token_lengths"] = (_token_lengths(teacher),
                                                                            _token_lengths(student))
        stage("vocabularies")
        same = teacher.fingerprint == student.fingerprint
        et, es = exact_pairs(teacher, student)
        arrays["exact_teacher"], arrays["exact_student"] = et, es
        stage("exact")
        if same:  # the identity, special tokens included
            st = np.asarray(sorted(teacher.special_ids), dtype=np.int64)
            ss, roles = st.copy(), ["identity"] * st.shape[0]
        else:
            st, ss, roles = special_pairs(teacher, student)
        arrays["special_teacher"], arrays["special_student"] = st, ss
        stage("specials")
        exact = {"t2s": (et, es), "s2t": (es, et)}
        special = {"t2s": (st, ss), "s2t": (ss, st)}
        for d, src_role, dst_role in DIRECTIONS:
            source, target = views[src_role], views[dst_role]
            if same:  # every id is its own partner, even where a vocabulary spells the same bytes twice
                partner = np.arange(source.vocab_size, dtype=np.int64)
            else:
                partner = exact_partner(*exact[d], source_size=source.vocab_size, target=target)
            proj = project(source, target, exact_partner=partner,
                           special_partner=partners(*special[d], source_special=source.special_ids))
            arrays[f"{d}_first"], arrays[f"{d}_weight"] = proj.first, proj.weight
            arrays[f"{d}_offsets"], arrays[f"{d}_pieces"] = proj.offsets, proj.pieces
            stats.update(_projection_stats(d, proj, source))
            stage(f"projection {d}")
        for d, src_role, dst_role in DIRECTIONS:
            source, target = views[src_role], views[dst_role]
            ids, scores = _neighbours(source, target, matched=exact[d][0], k=neighbours, window=window)
            arrays[f"{d}_neighbours"], arrays[f"{d}_neighbour_scores"] = ids, scores
            has = (ids >= 0).any(axis=1)
            stats[f"{d}_neighbour_rows"] = float(has.sum())
            stats[f"{d}_mean_top_neighbour_score"] = float(scores[has, 0].mean()) if has.any() else 0.0
            stage(f"neighbours {d}")

    for role, view, ids in (("teacher", teacher, et), ("student", student, es)):
        regular = view.vocab_size - len(view.special_ids)
        stats[f"{role}_vocab_size"] = float(view.vocab_size)
        stats[f"{role}_special_tokens"] = float(len(view.special_ids))
        stats[f"exact_{role}_tokens"] = float(np.unique(ids).shape[0])
        stats[f"exact_{role}_share"] = float(np.unique(ids).shape[0] / regular) if regular else 0.0
    smaller = "teacher" if teacher.vocab_size - len(teacher.special_ids) <= (
        student.vocab_size - len(student.special_ids)) else "student"
    stats["exact_pairs"] = float(et.shape[0])
    stats["exact_share_of_smaller"] = stats[f"exact_{smaller}_share"]
    stats["special_pairs"] = float(st.shape[0])
    info = {
        "stats": stats,
        "special_roles": roles,
        "parameters": {
            "neighbours": int(neighbours),
            "window": int(window),
            "scorer": f"rapidfuzz.distance.Levenshtein.{similarity().__name__}",
            "neighbour_queries": "non-special tokens without an exact match",
            "neighbour_scores": "normalised similarity rounded up to float16",
            "strings": "canonical bytes decoded as UTF-8 with surrogateescape",
            "exact_pinned": True,
        },
    }
    return arrays, info, timings
