"""Batched entropic OT (xtok_kd ``entropic_ot``) against POT's single-problem solver in a Python loop.

Both solve the same rows with the same epsilon, iteration cap and tolerance, log-domain on both sides
(``ot.sinkhorn2(..., method="sinkhorn_log")`` on the same torch tensors; torch inputs were faster than numpy ones for
POT's single solver on this machine), and the script prints rows/s side by side with the largest difference of the
returned transport costs.

Rows are realistic top-k rows: teacher logits ``N(0, s^2)`` with ``s ~ U(3, 7)`` over an 8,192-token vocabulary
(median top-1 probability ~0.37, top-64 mass ~0.97), student logits = teacher + ``N(0, 1)``; each side's top-k
plus a tail atom; the cost from :func:`~xtok_kd.losses.transport.lexical_cost` with a random table (85% of tokens
with an exact partner, the rest with a first piece and 4 scored neighbours).

Threads: ``torch.set_num_threads(1)`` by default, for both sides: POT's loop cannot use a second core on problems
this small, and the project's 2-core machine is shared, so extra threads only add noise. ``--threads`` changes it.

    python benchmarks/bench_sinkhorn.py [--rows 256] [--ks 16 64 256] [--threads 1]
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


def realistic_rows(rows: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 ``a (R, k+1)``, ``b (R, k+1)`` and lexical ``cost (R, k+1, k+1)``."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(rows, VOCAB, generator=g) * (3 + 4 * torch.rand(rows, 1, generator=g))
    student = teacher + torch.randn(rows, VOCAB, generator=g)
    a, teacher_ids = top_k_with_tail(teacher, k)
    b, student_ids = top_k_with_tail(student, k)
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
    """Wall time of POT's single-problem log-domain solver over every row, and its transport costs."""
    start = time.perf_counter()
    values = [ot.sinkhorn2(a[i], b[i], cost[i], knobs["epsilon"], method="sinkhorn_log",
                           numItermax=knobs["max_iter"], stopThr=knobs["tol"], warn=False) for i in range(len(a))]
    return time.perf_counter() - start, torch.stack([torch.as_tensor(v) for v in values])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256, help="rows per k (default 256: about 30 s in all)")
    parser.add_argument("--ks", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--epsilon", type=float, default=DEFAULT_EPSILON)
    parser.add_argument("--max-iter", type=int, default=DEFAULT_MAX_ITER)
    parser.add_argument("--tol", type=float, default=DEFAULT_TOL)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    knobs = {"epsilon": args.epsilon, "max_iter": args.max_iter, "tol": args.tol}
    print(f"torch {torch.__version__}, POT {ot.__version__}, {torch.get_num_threads()} thread(s), fp32, "
          f"epsilon={args.epsilon}, max_iter={args.max_iter}, tol={args.tol}")
    print("| k | rows | xtok_kd batched rows/s | POT loop rows/s | speed-up | max abs diff | mean iters | converged |")
    print("|---|---|---|---|---|---|---|---|")
    for k in args.ks:
        a, b, cost = realistic_rows(args.rows, k)
        entropic_ot(a[:8], b[:8], cost[:8], **knobs)  # warm-up
        batched_s, result = time_batched(a, b, cost, knobs)
        loop_s, values = time_loop(a, b, cost, knobs)
        diff = (result.transport_cost.double() - values.double()).abs().max().item()
        print(f"| {k} | {args.rows} | {args.rows / batched_s:,.0f} | {args.rows / loop_s:,.0f} | "
              f"**{loop_s / batched_s:.1f}x** | {diff:.1e} | {result.iterations.double().mean().item():.0f} | "
              f"{result.converged.double().mean().item():.1%} |", flush=True)


if __name__ == "__main__":
    main()
