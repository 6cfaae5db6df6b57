"""Cost builders: :func:`lexical_cost` (the vocabulary table), :func:`self_cost`, :func:`embedding_cost` and
:func:`embedding_self_cost`; all batched, no Python per row, no host round trip."""

from __future__ import annotations

import math

import torch

from . import common
from .common import _work_dtype

# ----------------------------------------------------------------------------------------------------------------
# cost builders


def _check_ids(name: str, ids: torch.Tensor) -> None:
    """``(R, k)`` integer ids; raise naming the bad shape or dtype."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point() or ids.dtype == torch.bool:
        got = f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"{name} must be an integer tensor (R, k) of token ids (-1 = empty slot), got {got}; "
                         f"pass the top-k indices")


def _check_table(name: str, table: torch.Tensor, rows: int, device: torch.device, ndim: int) -> None:
    """A per-token table of ``rows`` entries on ``device``; raise naming what differs."""
    if not isinstance(table, torch.Tensor) or table.dim() != ndim or table.shape[0] != rows:
        got = tuple(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__
        raise ValueError(f"{name} must have {ndim} dim(s) with {rows} rows (one per token of its source "
                         f"vocabulary), got {got}; pass the table of this tokenizer pair")
    if table.device != device:
        raise ValueError(f"{name} is on {table.device} but the ids are on {device}; move the table with "
                         f".to(device)")


def _with_tails(inner: torch.Tensor) -> torch.Tensor:
    """``(R, k, k2)`` token costs -> ``(R, k + 1, k2 + 1)``: tail-token 1, tail-tail 0."""
    rows, k, k2 = inner.shape
    out = inner.new_ones(rows, k + 1, k2 + 1)
    out[:, :k, :k2] = inner
    out[:, k, k2] = 0
    return out


def _length_ratio(numerator: torch.Tensor, denominator: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``numerator / denominator`` byte lengths, clamped to ``[0, 1]`` (a first piece is a prefix)."""
    return (numerator.to(dtype) / denominator.to(dtype).clamp_min(1)).clamp(0, 1)


def _lookup_slots(targets: torch.Tensor, queries: list[tuple[torch.Tensor, torch.Tensor]], bound: int
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Where query ids sit among their row's target ids: ``(slots (N,), canonical (R, k2) or None)``.

    Each query set is ``(rows, ids)``: ids ``>= 0`` (below ``bound``), sorted by row; ``slots`` covers the sets one
    after the other. A slot is a ``j`` with ``targets[row, j] == id``, or -1; ``canonical[r, j]`` is the slot the
    lookup answers for the id in slot ``j`` (``j`` itself unless the id is repeated in the row; ``None`` when no id
    is).

    Few queries (at most ``common._DIRECT_LOOKUP`` comparisons): each is compared with its row's ``k2`` targets (the first
    match answers). Otherwise no search and no ``(N, k2)`` comparison: rows are taken in blocks of ``B``; a
    vocabulary-wide map sends each id of the block's targets to one of their ``B k2`` positions (its
    representative), and a ``(B, B k2 + 1)`` table sends (row, representative) to the slot + 1. Both are written for
    one block, read by its queries, and reset (only the written entries) for the next; an id absent from the block
    maps to the table's last column, never written. Cost: ``O(N + R k2)`` gathers and scatters, one map of ``bound``
    entries, one table of ``~common._LOOKUP_TABLE`` entries, one host sync (where each block's queries start).
    """
    rows, width = targets.shape
    device = targets.device
    if not queries:
        return targets.new_empty(0), _first_slots(targets)
    if sum(ids.numel() for _, ids in queries) * width <= common._DIRECT_LOOKUP:
        query_rows, ids = _joined(queries)
        equal = targets.index_select(0, query_rows) == ids[:, None]
        return torch.where(equal.any(1), equal.to(torch.uint8).argmax(1), -1), _first_slots(targets)
    block = min(rows, max(1, math.isqrt(max(1, common._LOOKUP_TABLE // max(1, width)))))
    cols = block * width + 1
    absent = cols - 1
    positions = torch.full((bound + 1,), absent, dtype=torch.int32, device=device)  # [bound]: empty targets
    table = torch.zeros(block * cols, dtype=torch.int32, device=device)
    numbers = torch.arange(block * width, dtype=torch.int32, device=device)
    row_base = torch.arange(block, device=device)[:, None] * cols
    slot_numbers = torch.arange(1, width + 1, dtype=torch.int32, device=device).repeat(block)
    flat_targets = targets.masked_fill(targets < 0, bound)
    starts = torch.arange(0, rows + block, block, device=device)
    edges = torch.stack([torch.searchsorted(r, starts) for r, _ in queries]).tolist() if queries else []
    cells_of = [(r % block).mul_(cols) for r, _ in queries]  # a query's row within its block, times the width
    found: list[list[torch.Tensor]] = [[] for _ in queries]
    canonical = []
    for n, start in enumerate(range(0, rows, block)):
        b = min(block, rows - start)
        flat = flat_targets[start:start + b].reshape(-1)
        positions.scatter_(0, flat, numbers[:flat.numel()])
        cells = positions.index_select(0, flat).view(b, width).add(row_base[:b]).view(-1)
        table.scatter_(0, cells, slot_numbers[:flat.numel()])
        canonical.append(table.index_select(0, cells).view(b, width))
        for q, (_, ids) in enumerate(queries):
            first, last = edges[q][n], edges[q][n + 1]
            if last > first:
                cell = cells_of[q][first:last].add_(positions.index_select(0, ids[first:last]))
                found[q].append(table.index_select(0, cell))
        table.index_fill_(0, cells, 0)
        positions.index_fill_(0, flat, absent)
    slots = torch.cat([piece for f in found for piece in f] or [targets.new_empty(0, dtype=torch.int32)])
    canonical = (torch.cat(canonical) if len(canonical) > 1 else canonical[0]).long().sub_(1)
    identity = torch.arange(width, device=device).expand(rows, width)
    canonical = torch.where(targets >= 0, canonical, identity)
    return slots.long().sub_(1), None if torch.equal(canonical, identity) else canonical


def _first_slots(ids: torch.Tensor) -> torch.Tensor | None:
    """``(R, k)``: for each slot, the first slot of its row holding the same id; ``None`` if no id is repeated
    (ignoring -1)."""
    rows, width = ids.shape
    ordered, order = ids.sort(dim=1, stable=True)
    repeat = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    if not bool(repeat.any()):
        return None
    start = torch.arange(width, device=ids.device).repeat(rows, 1)
    start[:, 1:].masked_fill_(repeat, 0)
    first = order.gather(1, start.cummax(1).values)  # stable sort: a run starts at its smallest slot
    return torch.empty_like(order).scatter_(1, order, first)


def lexical_cost(teacher_ids: torch.Tensor, student_ids: torch.Tensor, *, exact_t2s: torch.Tensor,
                 t2s_first: torch.Tensor | None = None, s2t_first: torch.Tensor | None = None,
                 t2s_neighbours: torch.Tensor | None = None, t2s_neighbour_scores: torch.Tensor | None = None,
                 s2t_neighbours: torch.Tensor | None = None, s2t_neighbour_scores: torch.Tensor | None = None,
                 teacher_lengths: torch.Tensor | None = None, student_lengths: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Cost ``1 - similarity`` between every teacher top-k token and every student top-k token, plus tail atoms.

    Similarity of a pair (teacher ``t``, student ``s``), the largest that applies, 0 if none:

    * 1 for an exact canonical-byte pair, ``exact_t2s[t] == s``;
    * ``len(s) / len(t)`` (byte lengths) when ``s`` is the first piece of ``t``'s projection,
      ``t2s_first[t] == s``; ``len(t) / len(s)`` when ``s2t_first[s] == t``;
    * the table's score for an edit-distance neighbour: ``s`` in ``t2s_neighbours[t]`` or ``t`` in
      ``s2t_neighbours[s]``.

    Empty slots (id -1) cost 1 to everything (they carry no mass). The tail atoms (last index on each side) cost 0 to
    each other and 1 to every token. With the identity table of one tokenizer this equals :func:`self_cost`.

    Ids must lie in their vocabulary (an id out of range raises on CPU and asserts on CUDA). Built sparse, as the
    similarity is: every token's candidate partners (exact, first piece, neighbours) are gathered from the tables,
    those whose id appears nowhere among the other side's top-k ids of the batch are dropped (one vocabulary-wide
    membership map), the rest are located in their own row (``_lookup_slots``), and the matches are written into a
    cost of ones with one ``scatter_reduce`` (min) per side. Memory ``O(R k k2)`` for the result, ``O(R k K)`` for
    the candidates; two host syncs (the id ranges, and the candidate counts).

    Args:
        teacher_ids: ``(R, k)`` teacher top-k ids, -1 for an empty slot.
        student_ids: ``(R, k2)`` student top-k ids, likewise.
        exact_t2s: ``(Vt,)`` the student id with the same canonical bytes as each teacher id, -1 if none.
        t2s_first: ``(Vt,)`` first student piece of each teacher token, -1 if none (needs both lengths).
        s2t_first: ``(Vs,)`` first teacher piece of each student token, -1 if none (needs both lengths).
        t2s_neighbours, t2s_neighbour_scores: ``(Vt, K)`` student neighbours (-1 padded) and similarities in [0, 1].
        s2t_neighbours, s2t_neighbour_scores: ``(Vs, K')`` teacher neighbours and similarities.
        teacher_lengths: ``(Vt,)`` byte length of each teacher token; student_lengths: ``(Vs,)``.
        dtype: floating dtype of the result.

    Returns:
        ``(R, k + 1, k2 + 1)`` costs in ``[0, 1]``.
    """
    _check_ids("teacher_ids", teacher_ids)
    _check_ids("student_ids", student_ids)
    if student_ids.shape[0] != teacher_ids.shape[0]:
        raise ValueError(f"teacher_ids {tuple(teacher_ids.shape)} and student_ids {tuple(student_ids.shape)} need "
                         f"the same number of rows; pass the aligned rows of both sides")
    device = teacher_ids.device
    _check_table("exact_t2s", exact_t2s, exact_t2s.shape[0], device, 1)
    if t2s_first is not None or s2t_first is not None:
        if teacher_lengths is None or student_lengths is None:
            raise ValueError("t2s_first / s2t_first need teacher_lengths and student_lengths (byte lengths of every "
                             "token); pass both")
        _check_table("teacher_lengths", teacher_lengths, teacher_lengths.shape[0], device, 1)
        _check_table("student_lengths", student_lengths, student_lengths.shape[0], device, 1)
    if t2s_first is not None:
        _check_table("t2s_first", t2s_first, teacher_lengths.shape[0], device, 1)
    if s2t_first is not None:
        _check_table("s2t_first", s2t_first, student_lengths.shape[0], device, 1)
    t2s = _neighbour_tables("t2s", t2s_neighbours, t2s_neighbour_scores, device)
    s2t = _neighbour_tables("s2t", s2t_neighbours, s2t_neighbour_scores, device)
    teacher_ids, student_ids = teacher_ids.long(), student_ids.long()
    rows, k = teacher_ids.shape
    k2 = student_ids.shape[1]
    top_t, top_s = (int(v) for v in torch.stack([teacher_ids.max(), student_ids.max()]).tolist()) if rows * k * k2 \
        else (-1, -1)
    out = torch.ones(rows, k + 1, k2 + 1, dtype=dtype, device=device)
    out[:, k, k2] = 0
    if rows * k * k2 == 0:
        return out
    width = k2 + 1

    # teacher slot (r, i) -> its candidate student ids; the cell of a match at student slot j is
    # (r (k + 1) + i) (k2 + 1) + j = (r k + i + r) (k2 + 1) + j
    sources = [(exact_t2s, None, None)]
    if t2s_first is not None:
        sources.append((t2s_first, student_lengths, teacher_lengths))
    if t2s is not None:
        sources.append((t2s[0], t2s[1], None))
    found = _candidates(teacher_ids, student_ids, top_s, sources, dtype)
    slots, canon_s = _lookup_slots(student_ids, [(r, ids) for r, _, ids, _ in found], top_s + 1)
    r, slot_at, _, score = _joined(found)
    cells = [slot_at.add_(r).mul_(width).add_(slots.clamp(min=0))]
    values = [(1 - score.clamp_(0, 1)).masked_fill_(slots < 0, 1.0)]
    # student slot (r, j) -> its candidate teacher ids; a match at teacher slot i: (r (k + 1) + i) (k2 + 1) + j
    sources = []
    if s2t_first is not None:
        sources.append((s2t_first, teacher_lengths, student_lengths))
    if s2t is not None:
        sources.append((s2t[0], s2t[1], None))
    found = _candidates(student_ids, teacher_ids, top_t, sources, dtype)
    slots, canon_t = _lookup_slots(teacher_ids, [(r, ids) for r, _, ids, _ in found], top_t + 1)
    if found:
        r, slot_at, _, score = _joined(found)
        cells.append((r * (k + 1)).add_(slots.clamp(min=0)).mul_(width).add_(slot_at.sub_(r * k2)))
        values.append((1 - score.clamp_(0, 1)).masked_fill_(slots < 0, 1.0))
    out.view(-1).scatter_reduce_(0, torch.cat(cells) if len(cells) > 1 else cells[0],
                                 torch.cat(values) if len(values) > 1 else values[0], "amin")
    # an id repeated within a row: its matches were written at one of its slots; copy them to the others
    if canon_s is not None:
        out[:, :, :k2] = out[:, :, :k2].gather(2, canon_s[:, None, :].expand(rows, k + 1, k2))
    if canon_t is not None:
        out[:, :k, :] = out[:, :k, :].gather(1, canon_t[:, :, None].expand(rows, k, k2 + 1))
    return out


def _joined(parts: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """Concatenate per-source tuples field by field."""
    return parts[0] if len(parts) == 1 else tuple(torch.cat(field) for field in zip(*parts))


def _candidates(source_ids: torch.Tensor, target_ids: torch.Tensor, top: int,
                sources: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]], dtype: torch.dtype
                ) -> list[tuple[torch.Tensor, ...]]:
    """The candidate partners of every source slot whose id appears among the batch's target ids.

    ``source_ids`` ``(R, width)``; each entry of ``sources`` is ``(table, a, b)``: a ``(V,)`` partner table scored
    ``len(partner) / len(token)`` (``a``, ``b`` the partner-side and source-side byte lengths) or 1 (``a`` None), or a
    ``(V, K)`` neighbour table with its ``(V, K)`` scores ``a``. Returns, per source, ``(rows, flat_slot, ids,
    scores)`` of the kept candidates, sorted by row (``flat_slot = r width + slot``). Target ids lie in
    ``[-1, top]``; a candidate above ``top`` cannot match.
    """
    width = source_ids.shape[1]
    flat = source_ids.reshape(-1)
    token = flat.clamp_min(0)
    valid = None if bool((flat >= 0).all()) else flat >= 0  # empty source slots (-1) have no candidates
    # membership of every target id in the batch at id + 1; entries 0 (id -1) and top + 2 (ids above) stay False
    present = torch.zeros(top + 3, dtype=torch.bool, device=flat.device)
    present.index_fill_(0, target_ids.reshape(-1) + 1, True)
    present[0] = False
    out = []
    for table, a, b in sources:
        partners = table.index_select(0, token)  # (N,) or (N, K)
        keep = present.index_select(0, (partners.reshape(-1) + 1).clamp_(max=top + 2)).view(partners.shape)
        if valid is not None:
            keep &= valid if partners.dim() == 1 else valid[:, None]
        found = keep.view(-1).nonzero().view(-1)
        if partners.dim() == 1:
            slot, ids = found, partners.index_select(0, found)
            if a is None:
                scores = torch.ones(found.numel(), dtype=dtype, device=flat.device)
            else:
                scores = _length_ratio(a.index_select(0, ids), b.index_select(0, token.index_select(0, slot)), dtype)
        else:
            neighbours = partners.shape[1]
            slot = found.div(neighbours, rounding_mode="floor")
            ids = partners.view(-1).index_select(0, found)
            at = token.index_select(0, slot).mul_(neighbours).add_(found - slot * neighbours)
            scores = a.reshape(-1).index_select(0, at).to(dtype)
        out.append((slot.div(width, rounding_mode="floor"), slot, ids, scores))
    return out


def _neighbour_tables(name: str, neighbours: torch.Tensor | None, scores: torch.Tensor | None,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Check a neighbour table and its scores (both or neither, same shape, on ``device``)."""
    if (neighbours is None) != (scores is None):
        raise ValueError(f"{name}_neighbours and {name}_neighbour_scores go together; pass both or neither")
    if neighbours is None:
        return None
    _check_table(f"{name}_neighbours", neighbours, neighbours.shape[0], device, 2)
    _check_table(f"{name}_neighbour_scores", scores, neighbours.shape[0], device, 2)
    if scores.shape != neighbours.shape:
        raise ValueError(f"{name}_neighbour_scores {tuple(scores.shape)} must match {name}_neighbours "
                         f"{tuple(neighbours.shape)}")
    return neighbours, scores


def self_cost(ids: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(R, k + 1, k + 1)`` cost between one side's top-k and itself: 0 on equal ids and tail-tail, 1 otherwise.

    The ``a``-``a`` and ``b``-``b`` costs that go with :func:`lexical_cost` in :func:`sinkhorn_divergence` (empty
    slots, -1, cost 1 even to themselves, as in :func:`lexical_cost`; they carry no mass).

    Args:
        ids: ``(R, k)`` token ids, -1 for an empty slot.
        dtype: floating dtype of the result.
    """
    _check_ids("ids", ids)
    equal = (ids[:, :, None] == ids[:, None, :]) & (ids >= 0)[:, :, None]
    return _with_tails((~equal).to(dtype))


def _unit_embeddings(ids: torch.Tensor, embeddings: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(R, k, d)`` L2-normalised rows of ``embeddings`` for ``ids`` (-1 -> row 0, masked by the caller)."""
    rows = embeddings[ids.clamp_min(0)].to(dtype)
    return torch.nn.functional.normalize(rows, dim=-1)


def embedding_cost(teacher_ids: torch.Tensor, student_ids: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
    """Wasserstein-KD cost (Lv et al., NeurIPS 2024): ``1 - cos`` of teacher output embeddings, plus tail atoms.

    ``student_ids`` are the student top-k tokens already projected into the **teacher** vocabulary by the caller
    (-1 = unmapped or empty: cost 1 to everything). Both sides are gathered from ``embeddings`` (the teacher's
    ``lm_head`` weight), normalised, and compared with one batched matmul. A zero embedding has cosine 0 (cost 1).
    Tails: tail-tail 0, tail-token 1. For the self-costs of :func:`sinkhorn_divergence` use
    :func:`embedding_self_cost`.

    Args:
        teacher_ids: ``(R, k)`` teacher ids, -1 for an empty slot.
        student_ids: ``(R, k2)`` teacher-vocabulary ids of the student's tokens, -1 for unmapped or empty.
        embeddings: ``(Vt, d)`` teacher output embeddings, any floating dtype (math in fp32, fp64 if fp64).

    Returns:
        ``(R, k + 1, k2 + 1)`` costs in ``[0, 2]``, fp32 (fp64 for fp64 embeddings). Memory ``O(R (k + k2) d)``
        for the gathered rows plus ``O(R k k2)``.
    """
    _check_ids("teacher_ids", teacher_ids)
    _check_ids("student_ids", student_ids)
    if student_ids.shape[0] != teacher_ids.shape[0]:
        raise ValueError(f"teacher_ids {tuple(teacher_ids.shape)} and student_ids {tuple(student_ids.shape)} need "
                         f"the same number of rows; pass the aligned rows of both sides")
    if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2 or not embeddings.is_floating_point():
        got = f"{embeddings.dtype} {tuple(embeddings.shape)}" if isinstance(embeddings, torch.Tensor) else embeddings
        raise ValueError(f"embeddings must be a floating (Vt, d) tensor (the teacher lm_head weight), got {got}")
    _check_table("embeddings", embeddings, embeddings.shape[0], teacher_ids.device, 2)
    dtype = _work_dtype(embeddings)
    cosine = torch.bmm(_unit_embeddings(teacher_ids, embeddings, dtype),
                       _unit_embeddings(student_ids, embeddings, dtype).transpose(1, 2))
    valid = (teacher_ids >= 0)[:, :, None] & (student_ids >= 0)[:, None, :]
    return _with_tails(torch.where(valid, (1 - cosine).clamp(0, 2), 1.0))


def embedding_self_cost(ids: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
    """``(R, k + 1, k + 1)``: :func:`embedding_cost` of one side with itself, with a zero diagonal.

    The ``a``-``a`` (teacher ids) or ``b``-``b`` (student ids projected into the teacher vocabulary) cost of
    :func:`sinkhorn_divergence`. Every slot is at distance 0 from itself, an unmapped one too (it is the same token),
    so the cost is 0 on equal atoms as the divergence's guarantees ask; off the diagonal it is as
    :func:`embedding_cost`.
    """
    cost = embedding_cost(ids, ids, embeddings)
    return cost * (1 - torch.eye(cost.shape[1], dtype=cost.dtype, device=cost.device))
