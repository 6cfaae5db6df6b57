"""What two vocabularies share: the report behind ``xtok-kd inspect``, as a dict, as text, and as a picture
(PNG, PDF or SVG)."""

from __future__ import annotations

import os
import re
import stat
from typing import Any

import numpy as np

from ..tokenizer import TokenizerView
from .files import name_problem, probe_writable, write_atomically
from .fuzzy import token_strings
from .table import VocabAlignment

__all__ = ["CATEGORIES", "PLOT_FORMATS", "check_plot_target", "plot_format", "vocabulary_report", "format_report",
           "plot_report"]

PLOT_FORMATS = ("png", "pdf", "svg")
_PLOT_MARK = "xtok_kd inspect"  # written into every plot's metadata; an existing plot is replaced only with it
_PLOT_META_KEY = {"png": "Software", "pdf": "Creator", "svg": "Creator"}
_MAX_PLOT_BYTES = 64 << 20

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
            nbs = getattr(table, f"{d}_neighbours")[tid].tolist()
            nb = nbs[0] if nbs else -1
            rows.append({
                "id": tid,
                "token": _show(view.token_bytes(tid)),
                "pieces": [_show(other.token_bytes(p)) for p in table.decomposition(direction, tid)],
                "neighbour": _show(other.token_bytes(nb)) if nb >= 0 else None,
                "neighbour_score": float(getattr(table, f"{d}_neighbour_scores")[tid, 0]) if nbs else 0.0,
            })
        out[role] = {"unmatched": int(pool.shape[0]), "samples": rows}
    return out


def _show(data: bytes) -> str:
    """A token for people: its text, or ``<e9 a9>`` hex for bytes that are not whole UTF-8 characters."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "<" + " ".join(f"{b:02x}" for b in data) + ">"


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
        s = getattr(table, f"{d}_neighbour_scores").cpu().numpy().max(axis=1, initial=0.0)
        has = (getattr(table, f"{d}_neighbours").cpu().numpy() >= 0).any(axis=1)
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
    lines += [f"special tokens matched by role: {pairs}", "",
              "coverage by category (share with an exact match / mean pieces in the other vocabulary):"]
    lines.append(f"  {'category':<20} {'teacher tokens':>15} {'exact':>7} {'pieces':>7}   "
                 f"{'student tokens':>15} {'exact':>7} {'pieces':>7}")
    for name, c in report["categories"].items():
        lines.append(
            f"  {name:<20} {int(c['teacher_tokens']):>15,} {c['teacher_exact_share']:>7.1%} "
            f"{c['teacher_mean_pieces']:>7.2f}   {int(c['student_tokens']):>15,} "
            f"{c['student_exact_share']:>7.1%} {c['student_mean_pieces']:>7.2f}"
        )
    tx = report["text"]
    if tx:
        lines += [
            "",
            f"on the text ({tx['bytes']:,} bytes):",
            f"  fertility: teacher {tx['teacher_tokens_per_1000_bytes']:.2f}, student "
            f"{tx['student_tokens_per_1000_bytes']:.2f} tokens per 1,000 bytes",
            f"  chunks: {tx['chunks']:,}; 1:1 share {tx['one_to_one_share']:.2%}; mean chunk size "
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


def plot_format(path: str) -> str:
    """The picture format of ``path`` from its extension (``png``, ``pdf`` or ``svg``); ``ValueError`` otherwise."""
    ext = os.path.splitext(os.fspath(path))[1].lower().lstrip(".")
    if ext not in PLOT_FORMATS:
        raise ValueError(f"{os.fspath(path)!r} should end in .png, .pdf or .svg (the plot's format comes from the "
                         "extension)")
    return ext


def _figure_class() -> Any:
    """matplotlib's ``Figure`` (drawn without pyplot, so the caller's backend and figures are left alone)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(f"plots need matplotlib, a dependency of xtok_kd that is missing here ({err}); "
                          "install it: pip install 'matplotlib>=3.7'") from err
    return Figure


def _is_our_plot(path: str, info: os.stat_result) -> bool:
    if info.st_size > _MAX_PLOT_BYTES:
        return False
    try:
        with open(path, "rb") as f:
            return _PLOT_MARK.encode() in f.read(_MAX_PLOT_BYTES)
    except OSError:
        return False


def check_plot_target(path: str, *, create_folder: bool = False) -> str:
    """Raise unless a plot may be written at ``path``; returns its format.

    The extension must be ``.png``, ``.pdf`` or ``.svg`` and a format the installed matplotlib writes; ``path``
    must not be a folder; its folder must exist (or ``create_folder``) and be writable; an existing file is
    replaced only when it is a plot this module wrote (its metadata names ``xtok_kd inspect``), so no other file
    is ever lost.
    """
    path = os.fspath(path)
    if not path:
        raise ValueError("the plot path is empty; pass a file path ending in .png, .pdf or .svg")
    if "\0" in path:
        raise ValueError(f"{path!r} contains a NUL character; pass a valid file path")
    fmt = plot_format(path)
    _figure_class()
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    supported = FigureCanvasAgg.get_supported_filetypes()
    if fmt not in supported:
        raise ValueError(f"{path!r}: this matplotlib cannot write .{fmt}; use one of "
                         f"{sorted(set(PLOT_FORMATS) & set(supported))}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path!r} is a folder; pass a file path such as "
                                f"{os.path.join(path, 'overlap.' + fmt)!r}")
    problem = name_problem(path)
    if problem is not None:
        raise ValueError(f"cannot write {path!r}: {problem}")
    if os.path.lexists(path):
        try:
            info = os.stat(path)
        except OSError as err:
            raise FileExistsError(f"{path!r} exists and cannot be examined ({err.strerror or err}); "
                                  "choose another path") from None
        if not stat.S_ISREG(info.st_mode) or not _is_our_plot(path, info):
            raise FileExistsError(f"{path!r} exists and is not a plot written by xtok-kd inspect; it is never "
                                  "replaced: choose another path or remove it first")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        if os.path.lexists(folder):
            raise NotADirectoryError(f"cannot write {path!r}: {folder!r} is not a folder; choose another path")
        if create_folder:
            return fmt
        raise FileNotFoundError(f"cannot write {path!r}: the folder {folder!r} does not exist; create it "
                                f"(mkdir -p {folder}) or choose another path")
    try:
        probe_writable(folder)
    except OSError as err:
        raise PermissionError(f"cannot write {path!r}: no file can be created in {folder!r} "
                              f"({err.strerror or err}); choose a writable folder") from None
    return fmt


def plot_report(report: dict[str, Any], path: str) -> str:
    """Write a six-panel picture of the report to ``path``; returns the path.

    The format comes from the extension: ``.png``, ``.pdf`` or ``.svg``. The file is written atomically (a temp
    file renamed into place, removed on failure); an existing file is replaced only when it is a plot written here
    before (see :func:`check_plot_target`); a missing folder is created.

    Raises:
        ValueError: another extension.
        FileExistsError, IsADirectoryError, PermissionError, OSError: ``path`` cannot or may not be written.
    """
    path = os.fspath(path)
    fmt = check_plot_target(path, create_folder=True)
    figure = _figure_class()

    colours = {"teacher": "#1f77b4", "student": "#ff7f0e"}
    tname, sname = _short(report["teacher"]["name"]), _short(report["student"]["name"])
    label = {"teacher": f"teacher {tname}", "student": f"student {sname}"}
    fig = figure(figsize=(17, 9.5))
    axes = fig.subplots(2, 3)
    fig.suptitle(f"Vocabulary alignment: {tname} (teacher) -> {sname} (student)", fontsize=15, weight="bold")

    ax = axes[0, 0]
    ex = report["exact"]
    proj = report["projection"]
    names = ["exact match", "exact or neighbour\nscore >= 0.5", "projected\n(any pieces)"]
    values = {}
    for role, name in (("teacher", "teacher_to_student"), ("student", "student_to_teacher")):
        good = report["neighbour_score_histogram"][role][5:]
        regular = report[role]["vocab_size"] - report[role]["special_tokens"]
        values[role] = [ex[f"{role}_share"], ex[f"{role}_share"] + sum(good) / max(regular, 1),
                        proj[name]["mapped_share"]]
    _grouped_bars(ax, names, values, colours, label, percent=True)
    ax.set_title("Share of each vocabulary covered (non-special tokens)")

    ax = axes[0, 1]
    cats = list(report["categories"])
    values = {role: [report["categories"][c][f"{role}_exact_share"] for c in cats] for role in colours}
    _grouped_bars(ax, [c.replace(" ", "\n", 1) for c in cats], values, colours, label, percent=True)
    for i, c in enumerate(cats):
        n = report["categories"][c]
        ax.text(i, -0.16, f"{int(n['teacher_tokens']):,} / {int(n['student_tokens']):,}", ha="center",
                fontsize=8, color="0.3", transform=ax.get_xaxis_transform())
    ax.set_title("Exact-match share by category (token counts below)")

    ax = axes[0, 2]
    buckets = ["1", "2", "3", "4", "5+"]
    values = {role: _shares(report["pieces_histogram"][role]) for role in colours}
    _grouped_bars(ax, buckets, values, colours, label, percent=True)
    ax.set_xlabel("pieces in the other vocabulary")
    ax.set_ylabel("share of non-special tokens")
    ax.set_title("How many tokens each token re-tokenises into")

    ax = axes[1, 0]
    bins = [f"{b / 10:.1f}" for b in range(10)]
    values = {role: _shares(report["neighbour_score_histogram"][role]) for role in colours}
    _grouped_bars(ax, bins, values, colours, label, percent=True)
    ax.set_xlabel("best normalised edit-distance similarity (bin start)")
    ax.set_ylabel("share of tokens with a neighbour")
    ax.set_title("Nearest neighbour of tokens without an exact match")

    tx = report["text"]
    for ax in axes[1, 1:]:
        if not tx:
            ax.text(0.5, 0.5, "no --text given", ha="center", va="center", fontsize=12, color="0.4")
            ax.set_axis_off()
    if tx:
        ax = axes[1, 1]
        vals = [tx["teacher_tokens_per_1000_bytes"], tx["student_tokens_per_1000_bytes"]]
        bars = ax.bar([label["teacher"], label["student"]], vals, color=[colours["teacher"], colours["student"]])
        ax.bar_label(bars, fmt="%.2f", fontsize=10)
        ax.set_ylabel("tokens per 1,000 bytes")
        ax.set_title(f"Fertility on the text ({tx['bytes']:,} bytes)")
        ax = axes[1, 2]
        values = {role: _shares(tx[f"{role}_tokens_per_chunk_histogram"]) for role in colours}
        _grouped_bars(ax, buckets, values, colours, label, percent=True)
        ax.set_xlabel("tokens in a chunk")
        ax.set_ylabel("share of chunks")
        ax.set_title(f"Chunk sizes on the text: {tx['one_to_one_share']:.2%} of chunks are 1:1")
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomically(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=110,
                                                   metadata={_PLOT_META_KEY[fmt]: _PLOT_MARK}),
                     replace=True, check_target=lambda: check_plot_target(path))
    return path


def _short(name: str) -> str:
    return name.rstrip("/").split("/")[-1] or name


def _shares(counts: list[int]) -> list[float]:
    total = sum(counts)
    return [c / total if total else 0.0 for c in counts]


def _grouped_bars(ax: Any, names: list[str], values: dict[str, list[float]], colours: dict[str, str],
                  label: dict[str, str], *, percent: bool) -> None:
    x = np.arange(len(names))
    width = 0.38
    for k, role in enumerate(values):
        bars = ax.bar(x + (k - 0.5) * width, values[role], width, color=colours[role], label=label[role])
        if percent and len(names) <= 6:
            ax.bar_label(bars, labels=[f"{v:.0%}" for v in values[role]], fontsize=8, padding=1)
    ax.set_xticks(x, names)
    if percent:
        ax.set_ylim(0, 1.25)
        ax.yaxis.set_major_formatter(lambda v, _pos: f"{v:.0%}")
    ax.legend(fontsize=9, loc="upper center", ncol=2, frameon=False)
    ax.grid(axis="y", alpha=0.3)
