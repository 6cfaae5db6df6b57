"""Batched entropic OT (xtok_kd ``entropic_ot``, both solvers) against POT's single-problem solver in a Python loop,
and the lexical cost builder before and after its rewrite.

Solvers. All three solve the same rows with the same epsilon, iteration cap and tolerance:

* POT loop: ``ot.sinkhorn2(..., method="sinkhorn_log")`` per row, on the same torch tensors (torch inputs were
  faster than numpy ones for POT's single solver on this machine);
* ``solver="pot"``: POT's batched log-domain solver (``ot.batch.bregman_log_projection_batch``) in rounds;
* ``solver="fast"``: the exp-domain solver of :mod:`xtok_kd.losses.transport` (sparse kernel for the lexical cost,
  dense ``bmm`` kernel for the embedding cost). ``solver="auto"``, the default, takes it for every row here.

For each, rows/s, the speed-up over the loop, the largest difference of the transport costs from the loop's, the
share of rows that converged (the loop: POT's own last error below ``tol``) and the mean iterations.

Rows are realistic top-k rows: teacher logits ``N(0, s^2)`` with ``s ~ U(3, 7)`` over an 8,192-token vocabulary
(median top-1 probability ~0.37, top-64 mass ~0.97), student logits = teacher + ``N(0, 1)``; each side's top-k
plus a tail atom. Costs: :func:`~xtok_kd.losses.transport.lexical_cost` with a random table (85% of tokens with an
exact partner, the rest with a first piece and 4 scored neighbours), or ``1 - cosine`` of random 64-d embeddings
(:func:`~xtok_kd.losses.transport.embedding_cost`, the student ids read as teacher ids).

Cost builders: ``lexical_cost`` now (sparse candidates + slot lookup) against the previous implementation (one
broadcast comparison per neighbour column, kept below as ``lexical_cost_before``), on the synthetic table and on
the shipped Qwen2.5 -> Mistral table (8 neighbours per unmatched token; skipped if it cannot be built), rows/s
and whether the outputs are identical.

Threads: ``torch.set_num_threads(1)`` by default, for every side: POT's loop cannot use a second core on problems
this small, and the project's 2-core machine is shared, so extra threads only add noise. ``--threads`` changes it.

    python benchmarks/bench_sinkhorn.py [--rows 256] [--ks 16 64 256] [--costs lexical embedding] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import ot
import torch

from xtok_kd.losses.transport import (
    DEFAULT_EPSILON,
    DEFAULT_MAX_ITER,
    DEFAULT_TOL,
    embedding_cost,
    entropic_ot,
    lexical_cost,
)

VOCAB = 8192


def random_table(vocab: int, generator: torch.Generator, neighbours: int = 4) -> dict[str, torch.Tensor]:
    """A synthetic vocabulary table over one id space: exact partners for 85% of ids, first pieces and scored
    neighbours for the rest, byte lengths 1-8."""
    exact = torch.arange(vocab)
    missing = torch.rand(vocab, generator=generator) < 0.15
    exact[missing] = -1
    first = torch.where(missing, torch.randint(0, vocab, (vocab,), generator=generator), -1)
    lengths = torch.randint(1, 9, (vocab,), generator=generator)
    ids = torch.randint(0, vocab, (vocab, neighbours), generator=generator)
    scores = torch.rand(vocab, neighbours, generator=generator).sort(1, descending=True).values * 0.8
    ids[~missing], scores[~missing] = -1, 0
    return {"exact_t2s": exact, "t2s_first": first, "s2t_first": first.clone(), "t2s_neighbours": ids,
            "t2s_neighbour_scores": scores, "s2t_neighbours": ids.clone(), "s2t_neighbour_scores": scores.clone(),
            "teacher_lengths": lengths, "student_lengths": lengths}


def top_k_with_tail(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(R, k + 1)`` top-k probabilities plus the tail mass, and the ``(R, k)`` ids."""
    top, ids = logits.double().softmax(-1).topk(k, dim=-1)
    return torch.cat([top, (1 - top.sum(-1, keepdim=True)).clamp_min(0)], -1).float(), ids


def realistic_ids(rows: int, k: int, seed: int = 0):
    """fp32 ``a (R, k+1)``, ``b (R, k+1)``, the ``(R, k)`` teacher and student ids, and the generator."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(rows, VOCAB, generator=g) * (3 + 4 * torch.rand(rows, 1, generator=g))
    student = teacher + torch.randn(rows, VOCAB, generator=g)
    a, teacher_ids = top_k_with_tail(teacher, k)
    b, student_ids = top_k_with_tail(student, k)
    return a, b, teacher_ids, student_ids, g


def realistic_rows(rows: int, k: int, seed: int = 0, cost: str = "lexical"
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 ``a (R, k+1)``, ``b (R, k+1)`` and ``cost (R, k+1, k+1)`` (lexical or embedding)."""
    a, b, teacher_ids, student_ids, g = realistic_ids(rows, k, seed)
    if cost == "embedding":
        return a, b, embedding_cost(teacher_ids, student_ids, torch.randn(VOCAB, 64, generator=g))
    return a, b, lexical_cost(teacher_ids, student_ids, **random_table(VOCAB, g))


def time_batched(a, b, cost, knobs, repeats: int = 3):
    """Best wall time of ``repeats`` batched solves, and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = entropic_ot(a, b, cost, **knobs)
        best = min(best, time.perf_counter() - start)
    return best, result


def time_loop(a, b, cost, knobs):
    """Wall time of POT's single-problem log-domain solver over every row, its transport costs and converged flags."""
    start = time.perf_counter()
    out = [ot.sinkhorn2(a[i], b[i], cost[i], knobs["epsilon"], method="sinkhorn_log", numItermax=knobs["max_iter"],
                        stopThr=knobs["tol"], warn=False, log=True) for i in range(len(a))]
    seconds = time.perf_counter() - start
    values = torch.stack([torch.as_tensor(v) for v, _ in out])
    converged = torch.tensor([bool(log["err"]) and float(log["err"][-1]) < knobs["tol"] for _, log in out])
    return seconds, values, converged


def solver_table(cost_kind: str, args, knobs) -> None:
    print(f"\n**{cost_kind} cost** ({'sparse' if cost_kind == 'lexical' else 'dense'} kernel on the fast path)\n")
    print("| k | rows | POT loop rows/s | pot rows/s | vs loop | fast rows/s | vs loop | max diff pot | "
          "max diff fast | converged loop / pot / fast | mean iters pot / fast |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for k in args.ks:
        a, b, cost = realistic_rows(args.rows, k, cost=cost_kind)
        for solver in ("pot", "fast"):  # warm-up
            entropic_ot(a[:8], b[:8], cost[:8], solver=solver, **knobs)
        pot_s, pot = time_batched(a, b, cost, {**knobs, "solver": "pot"})
        fast_s, fast = time_batched(a, b, cost, {**knobs, "solver": "fast"}, repeats=5)
        loop_s, values, loop_ok = time_loop(a, b, cost, knobs)

        def diff(result, values=values):
            return (result.transport_cost.double() - values.double()).abs().max().item()

        rate = args.rows
        print(f"| {k} | {args.rows} | {rate / loop_s:,.0f} | {rate / pot_s:,.0f} | {loop_s / pot_s:.1f}x | "
              f"{rate / fast_s:,.0f} | **{loop_s / fast_s:.1f}x** | {diff(pot):.1e} | {diff(fast):.1e} | "
              f"{loop_ok.double().mean():.1%} / {pot.converged.double().mean():.1%} / "
              f"{fast.converged.double().mean():.1%} | {pot.iterations.double().mean():.0f} / "
              f"{fast.iterations.double().mean():.0f} |", flush=True)


# ----------------------------------------------------------------------------------------------------------------
# the lexical cost builder before the rewrite (the reference of the "before" column)


def lexical_cost_before(teacher_ids, student_ids, *, exact_t2s, t2s_first=None, s2t_first=None, t2s_neighbours=None,
                        t2s_neighbour_scores=None, s2t_neighbours=None, s2t_neighbour_scores=None,
                        teacher_lengths=None, student_lengths=None, dtype=torch.float32):
    """The previous ``lexical_cost``: a dense ``(R, k, k2)`` similarity raised rule by rule, one broadcast comparison
    per neighbour column (checks left out)."""
    def pair_best(sim, match, score):
        return torch.where(match, torch.maximum(sim, score), sim)

    def ratio(num, den):
        return (num.to(dtype) / den.to(dtype).clamp_min(1)).clamp(0, 1)

    def neighbours(sim, source, source_first, target3, table, scores):
        rows_n, rows_s = table[source], scores[source].to(sim.dtype)
        for column in range(table.shape[1]):
            ids, score = rows_n[:, :, column], rows_s[:, :, column]
            ids, score = (ids[:, :, None], score[:, :, None]) if source_first else (ids[:, None, :], score[:, None, :])
            sim = pair_best(sim, (ids == target3) & (ids >= 0), score)
        return sim

    t, s = teacher_ids.clamp_min(0), student_ids.clamp_min(0)
    t3, s3 = teacher_ids[:, :, None], student_ids[:, None, :]
    exact = exact_t2s[t][:, :, None]
    sim = ((exact == s3) & (exact >= 0)).to(dtype)
    if t2s_first is not None or s2t_first is not None:
        len_t, len_s = teacher_lengths[t][:, :, None], student_lengths[s][:, None, :]
    if t2s_first is not None:
        first = t2s_first[t][:, :, None]
        sim = pair_best(sim, (first == s3) & (first >= 0), ratio(len_s, len_t))
    if s2t_first is not None:
        first = s2t_first[s][:, None, :]
        sim = pair_best(sim, (first == t3) & (first >= 0), ratio(len_t, len_s))
    if t2s_neighbours is not None:
        sim = neighbours(sim, t, True, s3, t2s_neighbours, t2s_neighbour_scores)
    if s2t_neighbours is not None:
        sim = neighbours(sim, s, False, t3, s2t_neighbours, s2t_neighbour_scores)
    valid = (teacher_ids >= 0)[:, :, None] & (student_ids >= 0)[:, None, :]
    inner = torch.where(valid, 1 - sim.clamp(0, 1), 1.0)
    out = inner.new_ones(inner.shape[0], inner.shape[1] + 1, inner.shape[2] + 1)
    out[:, :-1, :-1] = inner
    out[:, -1, -1] = 0
    return out


def qwen_mistral_case(rows: int, k: int):
    """``(teacher_ids, student_ids, tables)`` on the shipped Qwen2.5 -> Mistral table: random teacher top-k ids, half
    of each student row the exact partners of the teacher's first ids (the overlap real top-k rows have), or None."""
    try:
        from xtok_kd import load_tokenizer, vocab
        from xtok_kd.losses.cdm_match import exact_partner_vector
        table = vocab.get_or_build(load_tokenizer("qwen2.5"), load_tokenizer("mistral"))
    except Exception as exc:  # noqa: BLE001 - a benchmark: say why and go on
        print(f"(Qwen2.5 -> Mistral table unavailable: {exc})")
        return None
    tables = {"exact_t2s": exact_partner_vector(table, "teacher_to_student")}
    for name, key in (("t2s_first", "t2s_first"), ("s2t_first", "s2t_first"), ("t2s_neighbours", "t2s_neighbours"),
                      ("t2s_neighbour_scores", "t2s_neighbour_scores"), ("s2t_neighbours", "s2t_neighbours"),
                      ("s2t_neighbour_scores", "s2t_neighbour_scores"), ("teacher_token_lengths", "teacher_lengths"),
                      ("student_token_lengths", "student_lengths")):
        tables[key] = torch.as_tensor(getattr(table, name))
    g = torch.Generator().manual_seed(1)
    vt, vs = tables["exact_t2s"].shape[0], tables["s2t_first"].shape[0]
    teacher = torch.stack([torch.randperm(vt, generator=g)[:k] for _ in range(rows)])
    student = torch.stack([torch.randperm(vs, generator=g)[:k] for _ in range(rows)])
    partner = tables["exact_t2s"][teacher[:, : k // 2]]
    student[:, : k // 2] = torch.where(partner >= 0, partner, student[:, : k // 2])
    return teacher, student, tables


def builder_table(args) -> None:
    print("\n**lexical_cost** (cost build, rows/s; best of 7)\n")
    print("| table | k | rows | before rows/s | now rows/s | speed-up | identical |")
    print("|---|---|---|---|---|---|---|")

    def best_of(fn, repeats=7):
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            out = fn()
            best = min(best, time.perf_counter() - start)
        return best, out

    cases = []
    for k in args.ks:
        _, _, teacher, student, g = realistic_ids(args.rows, k)
        cases.append(("synthetic, 4 neighbours", k, teacher, student, random_table(VOCAB, g)))
    real = qwen_mistral_case(args.rows, 64)
    if real is not None:
        cases.append(("Qwen2.5 -> Mistral, 8 neighbours", 64, *real))
    for name, k, teacher, student, tables in cases:
        before_s, before = best_of(lambda t=teacher, s=student, x=tables: lexical_cost_before(t, s, **x))
        now_s, now = best_of(lambda t=teacher, s=student, x=tables: lexical_cost(t, s, **x))
        print(f"| {name} | {k} | {args.rows} | {args.rows / before_s:,.0f} | {args.rows / now_s:,.0f} | "
              f"**{before_s / now_s:.1f}x** | {torch.equal(before, now)} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256, help="rows per k (default 256: about a minute in all)")
    parser.add_argument("--ks", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--costs", nargs="+", default=["lexical", "embedding"], choices=["lexical", "embedding"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--epsilon", type=float, default=DEFAULT_EPSILON)
    parser.add_argument("--max-iter", type=int, default=DEFAULT_MAX_ITER)
    parser.add_argument("--tol", type=float, default=DEFAULT_TOL)
    parser.add_argument("--no-builders", action="store_true", help="skip the cost-builder table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    knobs = {"epsilon": args.epsilon, "max_iter": args.max_iter, "tol": args.tol}
    print(f"torch {torch.__version__}, POT {ot.__version__}, {torch.get_num_threads()} thread(s), fp32, "
          f"epsilon={args.epsilon}, max_iter={args.max_iter}, tol={args.tol}")
    for cost_kind in args.costs:
        solver_table(cost_kind, args, knobs)
    if not args.no_builders:
        builder_table(args)


if __name__ == "__main__":
    main()
