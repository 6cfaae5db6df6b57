"""What two vocabularies share: the report behind ``xtok-kd inspect``, as a dict, as text, and as a PNG."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from ..tokenizer import TokenizerView
from .fuzzy import token_strings
from .table import VocabAlignment

__all__ = ["CATEGORIES", "vocabulary_report", "format_report", "plot_report"]

CATEGORIES: dict[str, re.Pattern[str]] = {
    "multi-digit numbers": re.compile(r"\s?[0-9]{2,}"),
    "whitespace runs": re.compile(r"\s{2,}"),
    "code indentation": re.compile(r"\n*(?: {2,}|\t+)"),
    "punctuation": re.compile(r"\s?[^\w\s]+\s*"),
    "CJK": re.compile(r".*[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af].*", re.S),
}
_SIDES = (("teacher", "t2s"), ("student", "s2t"))


def _side_arrays(table: VocabAlignment, d: str) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.diff(getattr(table, f"{d}_offsets").cpu().numpy())
    exact = np.zeros(lengths.shape[0], dtype=bool)
    exact[getattr(table, "exact_teacher" if d == "t2s" else "exact_student").cpu().numpy()] = True
    return lengths, exact


def _categories(table: VocabAlignment, views: dict[str, TokenizerView]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {name: {} for name in CATEGORIES}
    for role, d in _SIDES:
        view = views[role]
        strings = token_strings(view.all_token_bytes())
        lengths, exact = _side_arrays(table, d)
        special = view.special_ids
        for name, pattern in CATEGORIES.items():
            ids = np.asarray([i for i, s in enumerate(strings) if i not in special and pattern.fullmatch(s)],
                             dtype=np.int64)
            n = ids.shape[0]
            out[name][f"{role}_tokens"] = float(n)
            out[name][f"{role}_exact_share"] = float(exact[ids].mean()) if n else 0.0
            out[name][f"{role}_single_piece_share"] = float((lengths[ids] == 1).mean()) if n else 0.0
            out[name][f"{role}_mean_pieces"] = float(lengths[ids].mean()) if n else 0.0
    return out


def _text_stats(text: str, views: dict[str, TokenizerView], *, batch: int = 256) -> dict[str, Any]:
    from ..sequence import align_spans

    pieces = [p for p in re.split(r"(?<=\n\n)", text) if p]  # paragraphs, separators kept: no byte is lost
    encs = {role: views[role].encode_batch(pieces, add_special_tokens=False) for role in views}
    num_bytes = sum(e.num_bytes for e in encs["teacher"])
    totals = {"chunks": 0, "one_to_one": 0, "teacher_tokens": 0, "student_tokens": 0}
    t_hist = np.zeros(6, dtype=np.int64)
    s_hist = np.zeros(6, dtype=np.int64)
    for lo in range(0, len(pieces), batch):
        al = align_spans([e.spans for e in encs["teacher"][lo : lo + batch]],
                         [e.spans for e in encs["student"][lo : lo + batch]])
        totals["chunks"] += al.num_chunks
        totals["one_to_one"] += int(((al.teacher_count == 1) & (al.student_count == 1)).sum())
        totals["teacher_tokens"] += int(al.teacher_count.sum())
        totals["student_tokens"] += int(al.student_count.sum())
        t_hist += np.bincount(np.minimum(al.teacher_count, 5), minlength=6)[:6]
        s_hist += np.bincount(np.minimum(al.student_count, 5), minlength=6)[:6]
    chunks = max(totals["chunks"], 1)
    return {
        "bytes": num_bytes,
        "teacher_tokens": sum(len(e) for e in encs["teacher"]),
        "student_tokens": sum(len(e) for e in encs["student"]),
        "teacher_tokens_per_1000_bytes": 1000.0 * sum(len(e) for e in encs["teacher"]) / max(num_bytes, 1),
        "student_tokens_per_1000_bytes": 1000.0 * sum(len(e) for e in encs["student"]) / max(num_bytes, 1),
        "chunks": totals["chunks"],
        "one_to_one_share": totals["one_to_one"] / chunks,
        "mean_teacher_tokens_per_chunk": totals["teacher_tokens"] / chunks,
        "mean_student_tokens_per_chunk": totals["student_tokens"] / chunks,
        "teacher_tokens_per_chunk_histogram": t_hist[1:].tolist(),  # 1, 2, 3, 4, 5+
        "student_tokens_per_chunk_histogram": s_hist[1:].tolist(),
    }


def _samples(table: VocabAlignment, views: dict[str, TokenizerView], *, count: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {}
    for role, d in _SIDES:
        other = views["student" if role == "teacher" else "teacher"]
        view = views[role]
        lengths, exact = _side_arrays(table, d)
        regular = np.ones(lengths.shape[0], dtype=bool)
        regular[list(view.special_ids)] = False
        pool = np.flatnonzero(~exact & regular & (view.token_lengths > 0))
        pick = np.sort(rng.choice(pool, size=min(count, pool.shape[0]), replace=False)) if pool.size else pool
        direction = "teacher_to_student" if d == "t2s" else "student_to_teacher"
        rows = []
        for tid in pick.tolist():
            nb = int(getattr(table, f"{d}_neighbours")[tid, 0])
            rows.append({
                "id": tid,
                "token": token_strings([view.token_bytes(tid)])[0],
                "pieces": token_strings([other.token_bytes(p) for p in table.decomposition(direction, tid)]),
                "neighbour": token_strings([other.token_bytes(nb)])[0] if nb >= 0 else None,
                "neighbour_score": float(getattr(table, f"{d}_neighbour_scores")[tid, 0]),
            })
        out[role] = {"unmatched": int(pool.shape[0]), "samples": rows}
    return out


def vocabulary_report(
    table: VocabAlignment, teacher: TokenizerView, student: TokenizerView, *, text: str | None = None,
    samples: int = 8, seed: int = 0
) -> dict[str, Any]:
    """Everything ``xtok-kd inspect`` shows, as plain JSON-ready values.

    Args:
        table: the pair's table (built or loaded; its fingerprints should match the tokenizers).
        teacher: the teacher's view.
        student: the student's view.
        text: optional text for fertility and chunk statistics (encoded by paragraphs, aligned in batches).
        samples: unmatched tokens shown per side.
        seed: seed of the sample.
    """
    views = {"teacher": teacher, "student": student}
    st = table.stats
    report: dict[str, Any] = {
        "teacher": table.metadata["teacher"] | {"special_tokens": len(teacher.special_ids)},
        "student": table.metadata["student"] | {"special_tokens": len(student.special_ids)},
        "exact": {
            "pairs": int(st["exact_pairs"]),
            "teacher_share": st["exact_teacher_share"],
            "student_share": st["exact_student_share"],
            "share_of_smaller_vocabulary": st["exact_share_of_smaller"],
        },
        "projection": {
            name: {key: st[f"{d}_{key}"] for key in ("mapped_share", "single_piece_share", "mean_pieces",
                                                      "fallback_splits", "neighbour_rows",
                                                      "mean_top_neighbour_score")}
            for name, d in (("teacher_to_student", "t2s"), ("student_to_teacher", "s2t"))
        },
        "special_pairs": [
            {"role": role, "teacher": teacher.hf.convert_ids_to_tokens(int(t)),
             "student": student.hf.convert_ids_to_tokens(int(s))}
            for role, t, s in zip(table.metadata["special_roles"], table.special_teacher.tolist(),
                                  table.special_student.tolist())
        ],
        "categories": _categories(table, views),
        "unmatched": _samples(table, views, count=samples, seed=seed),
        "text": _text_stats(text, views) if text else None,
    }
    scores = {}
    for role, d in _SIDES:
        s = getattr(table, f"{d}_neighbour_scores")[:, 0].cpu().numpy()
        has = getattr(table, f"{d}_neighbours")[:, 0].cpu().numpy() >= 0
        scores[role] = np.histogram(s[has], bins=10, range=(0.0, 1.0))[0].tolist()
    report["neighbour_score_histogram"] = scores
    report["pieces_histogram"] = {
        role: np.bincount(np.minimum(_side_arrays(table, d)[0], 5), minlength=6)[1:].tolist() for role, d in _SIDES
    }
    return report


def format_report(report: dict[str, Any]) -> str:
    """The report as text for a terminal."""
    t, s, ex = report["teacher"], report["student"], report["exact"]
    lines = [
        f"teacher  {t['name']}  ({t['family']}, {t['vocab_size']:,} ids, {t['special_tokens']} special, "
        f"fingerprint {t['fingerprint']})",
        f"student  {s['name']}  ({s['family']}, {s['vocab_size']:,} ids, {s['special_tokens']} special, "
        f"fingerprint {s['fingerprint']})",
        "",
        f"exact overlap: {ex['pairs']:,} pairs = {ex['teacher_share']:.1%} of the teacher vocabulary, "
        f"{ex['student_share']:.1%} of the student vocabulary ({ex['share_of_smaller_vocabulary']:.3f} of the "
        "smaller)",
        "projection coverage (non-special tokens):",
    ]
    for name, p in report["projection"].items():
        lines.append(
            f"  {name:<19} mapped {p['mapped_share']:.1%}, single piece {p['single_piece_share']:.1%}, "
            f"mean pieces {p['mean_pieces']:.2f}, byte-split fallbacks {int(p['fallback_splits'])}, "
            f"neighbours for {int(p['neighbour_rows']):,} unmatched (mean best score "
            f"{p['mean_top_neighbour_score']:.2f})"
        )
    pairs = ", ".join(f"{x['teacher']}={x['student']} ({x['role']})" for x in report["special_pairs"]) or "none"
    lines += [f"special tokens matched by role: {pairs}", "", "coverage by category (exact share / single piece):"]
    lines.append(f"  {'category':<20} {'teacher tokens':>15} {'exact':>7} {'1 piece':>8}   "
                 f"{'student tokens':>15} {'exact':>7} {'1 piece':>8}")
    for name, c in report["categories"].items():
        lines.append(
            f"  {name:<20} {int(c['teacher_tokens']):>15,} {c['teacher_exact_share']:>7.1%} "
            f"{c['teacher_single_piece_share']:>8.1%}   {int(c['student_tokens']):>15,} "
            f"{c['student_exact_share']:>7.1%} {c['student_single_piece_share']:>8.1%}"
        )
    tx = report["text"]
    if tx:
        lines += [
            "",
            f"on the text ({tx['bytes']:,} bytes):",
            f"  fertility: teacher {tx['teacher_tokens_per_1000_bytes']:.1f}, student "
            f"{tx['student_tokens_per_1000_bytes']:.1f} tokens per 1,000 bytes",
            f"  chunks: {tx['chunks']:,}; 1:1 share {tx['one_to_one_share']:.1%}; mean chunk size "
            f"{tx['mean_teacher_tokens_per_chunk']:.3f} teacher / {tx['mean_student_tokens_per_chunk']:.3f} "
            "student tokens",
        ]
    for role in ("teacher", "student"):
        u = report["unmatched"][role]
        lines += ["", f"{role} tokens without an exact match: {u['unmatched']:,}; samples "
                      "(token -> decomposition | nearest neighbour, score):"]
        for row in u["samples"]:
            nb = f"{row['neighbour']!r} {row['neighbour_score']:.2f}" if row["neighbour"] is not None else "-"
            lines.append(f"  {row['token']!r:<24} -> {' + '.join(repr(p) for p in row['pieces']):<40} | {nb}")
    return "\n".join(lines)


def plot_report(report: dict[str, Any], path: str) -> str:
    """Write a six-panel PNG of the report to ``path`` (needs matplotlib); returns the path."""
    from .report_plot import draw

    return draw(report, path)
