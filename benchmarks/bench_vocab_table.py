"""Full vocabulary table (all methods, both directions) against brute-force MinED, side by side in one run.

    python benchmarks/bench_vocab_table.py [--teacher PATH] [--student PATH] [--full]

The brute force is FuseLLM-style MinED: ``rapidfuzz.process.cdist`` of the query tokens against the whole other
vocabulary (chunked to bound memory, ``workers=-1``), with the scorer the table's neighbour search uses
(normalised Levenshtein similarity). Its queries are the tokens the table's neighbours cover: non-special tokens
without an exact match, both directions. ``--full`` also scans every teacher token against every student token
(what FuseLLM does, about a minute); otherwise that time is estimated from the measured pair rate.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

SHARED = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "tokenizers"))
ROOT = os.environ.get("XTOK_KD_TOKENIZERS", SHARED)


def brute_force(queries: list[str], choices: list[str], *, rows: int = 1024) -> tuple[np.ndarray, np.ndarray, int]:
    """Best similarity and its (lowest) index for every query over all ``choices``; also the pairs scored."""
    from rapidfuzz import process
    from rapidfuzz.distance import Levenshtein

    best = np.zeros(len(queries), dtype=np.float32)
    arg = np.full(len(queries), -1, dtype=np.int64)
    for lo in range(0, len(queries), rows):
        scores = process.cdist(queries[lo : lo + rows], choices, scorer=Levenshtein.normalized_similarity,
                               dtype=np.float32, workers=-1)
        arg[lo : lo + rows] = scores.argmax(axis=1)
        best[lo : lo + rows] = scores.max(axis=1)
    return best, arg, len(queries) * len(choices)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default=os.path.join(ROOT, "qwen2.5"))
    parser.add_argument("--student", default=os.path.join(ROOT, "llama3.2"))
    parser.add_argument("--full", action="store_true", help="also run the all-pairs brute force (slow)")
    args = parser.parse_args()

    from xtok_kd.tokenizer import load_tokenizer
    from xtok_kd.vocab import VocabAlignment
    from xtok_kd.vocab.fuzzy import token_strings

    print(f"cores: {os.cpu_count()}  teacher: {args.teacher}  student: {args.student}")
    start = time.perf_counter()
    cold = VocabAlignment.build(args.teacher, args.student, progress=False)
    cold_s = time.perf_counter() - start
    teacher, student = load_tokenizer(args.teacher), load_tokenizer(args.student)
    start = time.perf_counter()
    table = VocabAlignment.build(teacher, student, progress=False)
    build_s = time.perf_counter() - start
    assert table.metadata["stats"] == cold.metadata["stats"]
    stages = ", ".join(f"{k} {v:.2f}" for k, v in table.timings.items())
    print(f"\n[xtok_kd] full table, all methods, both directions: {build_s:.2f} s "
          f"(from tokenizer folders, loading included: {cold_s:.2f} s)")
    print(f"          stages (s): {stages}")

    views = {"t2s": (teacher, student), "s2t": (student, teacher)}
    total_pairs = 0
    brute_s = 0.0
    rows = []
    for d, (source, target) in views.items():
        has = (getattr(table, f"{d}_neighbours") >= 0).any(dim=1).numpy()
        exact = np.zeros(source.vocab_size, dtype=bool)
        exact[getattr(table, "exact_teacher" if d == "t2s" else "exact_student").numpy()] = True
        query = ~exact & (source.token_lengths > 0)
        query[list(source.special_ids)] = False
        qids = np.flatnonzero(query)
        src = token_strings(source.all_token_bytes())
        tgt = token_strings(target.all_token_bytes())
        cand = np.asarray([i for i in range(target.vocab_size) if i not in target.special_ids and tgt[i]])
        start = time.perf_counter()
        best, arg, pairs = brute_force([src[i] for i in qids.tolist()], [tgt[i] for i in cand.tolist()])
        brute_s += time.perf_counter() - start
        total_pairs += pairs
        ours = getattr(table, f"{d}_neighbour_scores")[qids, 0].numpy()
        ours_id = getattr(table, f"{d}_neighbours")[qids, 0].numpy()
        worse = best > ours + 1e-6
        same_id = ours_id == np.where(best > 0, cand[arg], -1)
        rows.append((d, qids.shape[0], int(has[qids].sum()), int(worse.sum()), float((best - ours)[worse].mean())
                     if worse.any() else 0.0, int(same_id.sum())))

    rate = total_pairs / brute_s
    print(f"[brute]   MinED cdist on the same queries (tokens without an exact match, both directions): "
          f"{brute_s:.2f} s for {total_pairs / 1e9:.2f} G pairs ({rate / 1e6:.0f} M pairs/s)")
    full_pairs = 2 * (teacher.vocab_size * student.vocab_size)
    print(f"[brute]   full-vocabulary MinED both directions, {full_pairs / 1e9:.1f} G pairs: "
          f"~{full_pairs / rate:.0f} s (estimated from that rate; run with --full to measure one direction)")
    print(f"\nspeed-up of the full build over the brute force on the same queries: {brute_s / build_s:.1f}x"
          f" (over the estimated full-vocabulary brute force: {full_pairs / rate / build_s:.1f}x)")
    print("\nnearest-neighbour agreement (best score found vs brute-force best score):")
    print(f"  {'dir':<4} {'queries':>8} {'covered':>8} {'worse':>7} {'share':>7} {'mean gap':>9} {'same id':>8}")
    for d, n, covered, worse, gap, same in rows:
        print(f"  {d:<4} {n:>8,} {covered:>8,} {worse:>7,} {worse / max(n, 1):>7.2%} {gap:>9.3f} "
              f"{same / max(n, 1):>8.1%}")
    print("  (worse: the pruned search's best neighbour scores below the brute force's best; 'same id' differs "
          "more often because many candidates tie on the best score)")
    if args.full:
        t_str = token_strings(teacher.all_token_bytes())
        s_str = token_strings(student.all_token_bytes())
        start = time.perf_counter()
        _, _, pairs = brute_force(t_str, s_str)
        full_s = time.perf_counter() - start
        print(f"\n[brute]   measured full-vocabulary MinED, teacher -> student only: {full_s:.1f} s "
              f"({pairs / 1e9:.1f} G pairs); full build is {full_s / build_s:.1f}x faster than this one direction")


if __name__ == "__main__":
    main()
