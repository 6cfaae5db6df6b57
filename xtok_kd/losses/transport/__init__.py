r"""Entropic optimal transport between top-k distributions, batched over rows (the core of ``mapping="sinkhorn"``).

Every aligned row compares the teacher's top-k distribution with the student's top-k distribution. Each side gets
one extra **tail atom** (last index) holding the mass outside its top-k, so both marginals sum to 1 and the problem
is balanced. Given a cost between the ``k + 1`` teacher atoms and the ``k2 + 1`` student atoms, the row's loss is
the entropic optimal transport objective

.. math::
    \mathrm{OT}_\varepsilon(a, b) = \min_{T \ge 0,\ T\mathbf 1 = a,\ T^\top \mathbf 1 = b}
        \langle T, M\rangle + \varepsilon\, \mathrm{KL}(T \,\|\, a b^\top),

solved for all rows at once by Sinkhorn's algorithm, and the unbiased Sinkhorn divergence
:math:`S_\varepsilon(a, b) = \mathrm{OT}_\varepsilon(a, b) - \tfrac12 \mathrm{OT}_\varepsilon(a, a)
- \tfrac12 \mathrm{OT}_\varepsilon(b, b)` (Feydy et al., AISTATS 2019), which is 0 for identical inputs.

Two solvers run the same iterations (``solver=`` of :func:`entropic_ot`; gradients by the envelope theorem either
way, see ``_EntropicOT``):

* ``"pot"``: POT's batched log-domain Sinkhorn (:func:`ot.batch.bregman_log_projection_batch`) in rounds of 10
  iterations, converged rows leaving the batch; self-problems by the averaged update (``_symmetric_rounds``). Any
  cost; the reference.
* ``"fast"``: the same updates exponentiated (``_fast_iterate``): ``x = 1 / K diag(b) y``, ``y = 1 / K^T diag(a) x``
  with ``K = exp(-(M - min M) / eps)`` built once per row, so each iteration is two kernel products instead of two
  log-sum-exp passes. A cost that equals its row maximum almost everywhere (:func:`lexical_cost`,
  :func:`self_cost`: ~1-3% of the entries below it) gets a sparse kernel ``c 1 1^T + S`` and products in
  ``O(k + nnz)`` per row; any other cost a dense one (``bmm``) in L2-sized blocks. It needs the kernel in floating
  range: a row's cost span ``(max M - min M) / eps`` at most 30 in fp32 (300 in fp64). POT is not used on this path.
* ``"auto"`` (default): ``"fast"`` for the rows within the span limit, ``"pot"`` for the others and for any row the
  fast path returned non-finite.

At k=64 on realistic lexical rows the fast path is ~50x POT's single-problem solver in a Python loop and ~20x the
batched POT path on one CPU thread (``benchmarks/bench_sinkhorn.py``).

Costs (all in ``[0, 1]`` except the embedding cost, in ``[0, 2]``) come from three builders: :func:`lexical_cost`
(the vocabulary table: exact pairs, first pieces of projections, edit-distance neighbours), :func:`self_cost` (the
``a``-``a`` and ``b``-``b`` costs that go with it) and :func:`embedding_cost` (``1 - cosine`` of the teacher's
output embeddings, as in Wasserstein distillation, Lv et al., NeurIPS 2024). Tail atoms: tail-tail costs 0,
tail-token costs 1 (the tail is "some other token", as far from every listed token as an unrelated one).

When to choose it: the projection mapping needs a table row for every token and moves mass only along it; transport
lets mass flow to any similar token, with a cost that says how similar, and needs no normalisation of unmatched
mass. It costs ``O(R k k2)`` memory and a few dozen Sinkhorn iterations per row.
"""

from __future__ import annotations

from .common import DEFAULT_EPSILON, DEFAULT_MAX_ITER, DEFAULT_TOL, TransportResult
from .costs import embedding_cost, embedding_self_cost, lexical_cost, self_cost
from .solve import entropic_ot, sinkhorn_divergence

__all__ = [
    "DEFAULT_EPSILON",
    "DEFAULT_MAX_ITER",
    "DEFAULT_TOL",
    "TransportResult",
    "embedding_cost",
    "embedding_self_cost",
    "entropic_ot",
    "lexical_cost",
    "self_cost",
    "sinkhorn_divergence",
]
