"""Slow float64 references for the losses: everything materialised, loops over chunks, written independently of the
fast path (no import from ``xtok_kd.losses``). Tests compare values AND gradients with these."""

from __future__ import annotations

import numpy as np
import torch

FLOOR_PROB = 1e-8


# ---------------------------------------------------------------- divergences on probability vectors (1-D, float64)
def _kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mask = a > 0
    return (a[mask] * (torch.log(a[mask]) - torch.log(b[mask]))).sum()


def ref_divergence(p: torch.Tensor, q: torch.Tensor, kind: str, *, beta=0.5, alpha=0.1, mu=0.5) -> torch.Tensor:
    """Divergence between probability vectors ``p`` (teacher) and ``q`` (student), straight from the papers."""
    if kind == "fkl":
        return _kl(p, q)
    if kind == "rkl":
        return _kl(q, p)
    if kind == "symmetric_kl":
        return _kl(p, q) + _kl(q, p)
    if kind == "tvd":
        return 0.5 * (p - q).abs().sum()
    if kind == "jsd":
        if beta == 0:
            return _kl(p, q)
        if beta == 1:
            return _kl(q, p)
        m = beta * p + (1 - beta) * q
        return beta * _kl(p, m) + (1 - beta) * _kl(q, m)
    if kind == "skl":
        return _kl(p, alpha * p + (1 - alpha) * q)
    if kind == "srkl":
        return _kl(q, alpha * q + (1 - alpha) * p)
    if kind == "akl":
        order = torch.argsort(p.detach(), descending=True)
        head = torch.zeros_like(p, dtype=torch.bool)
        cum = 0.0
        for i in order.tolist():
            if cum >= mu:
                break
            head[i] = True
            cum += float(p[i].detach())
        gap = (p - q).abs()
        gh, gt = gap[head].sum(), gap[~head].sum()
        if float((gh + gt).detach()) == 0.0:
            return p.sum() * 0
        return gh / (gh + gt) * _kl(p, q) + gt / (gh + gt) * _kl(q, p)
    raise ValueError(kind)


def ref_sorted_l1(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    n = max(p.shape[0], q.shape[0])
    ps = torch.zeros(n, dtype=p.dtype).index_copy(0, torch.arange(p.shape[0]), torch.sort(p, descending=True).values)
    qs = torch.zeros(n, dtype=q.dtype).index_copy(0, torch.arange(q.shape[0]), torch.sort(q, descending=True).values)
    return (ps - qs).abs().sum()


# ---------------------------------------------------------------- the full loss, chunk by chunk
def _chunk_rows(alignment, only_loss=True):
    """Per usable chunk: (sample, teacher first, teacher count, student first, student count)."""
    out = []
    for c in range(alignment.num_chunks):
        if alignment.teacher_first[c] < 1 or alignment.student_first[c] < 1:
            continue
        if only_loss and not alignment.chunk_loss_mask[c]:
            continue
        out.append((int(alignment.chunk_sample[c]), int(alignment.teacher_first[c]), int(alignment.teacher_count[c]),
                    int(alignment.student_first[c]), int(alignment.student_count[c])))
    return out


def _merged(logits_b: torch.Tensor, ids_b, first: int, count: int, merge: str, T: float) -> torch.Tensor:
    """Chain-rule merge of one chunk on one side, in probability space (GOLD's definition)."""
    probs = torch.softmax(logits_b / T, -1)
    if merge == "none" or count == 1:
        return probs[first - 1]
    if merge == "observed":
        base, others = first - 1, range(first + 1, first + count)
    else:
        base, others = first + count - 2, range(first, first + count - 1)
    out = probs[base]
    for tok_pos in others:
        out = out * probs[tok_pos - 1, int(ids_b[tok_pos])].clamp_min(FLOOR_PROB)
    return out


def ref_loss(
    student_logits, teacher_logits, alignment, *, mapping, kind="fkl", T=1.0, scale_T2=True, merge="none",
    proj=None, direction="student_to_teacher", matched=None, top_k=None, beta=0.5, alpha=0.1, mu=0.5,
    student_ids=None, teacher_ids=None, vt=None, vs=None, hybrid_weights=None, reduction="mean",
):
    """Per-chunk losses (reduction none) or their mean/sum, in float64.

    ``proj``: dense ``(V_src, V_dst)`` projection matrix for ``direction``; ``matched``: (teacher ids, student ids).
    """
    s_all = student_logits.double()
    t_all = teacher_logits.double()
    vs = vs or s_all.shape[-1]
    vt = vt or t_all.shape[-1]
    s_all, t_all = s_all[..., :vs], t_all[..., :vt]
    losses = []
    for b, tf, tc, sf, sc in _chunk_rows(alignment):
        p = _merged(t_all[b], None if teacher_ids is None else teacher_ids[b], tf, tc, merge, T)
        q = _merged(s_all[b], None if student_ids is None else student_ids[b], sf, sc, merge, T)
        if mapping == "projection":
            if direction == "student_to_teacher":
                qp = q @ proj
                support = proj.sum(0) > 0
                pt, qt = p[support] / p[support].sum(), qp[support] / qp[support].sum()
            else:
                pp = p @ proj
                support = proj.sum(0) > 0
                pt, qt = pp[support] / pp[support].sum(), q[support] / q[support].sum()
            val = ref_divergence(pt, qt, kind, beta=beta, alpha=alpha, mu=mu)
        elif mapping == "uld":
            if top_k is None:
                val = ref_sorted_l1(p, q)
            else:
                ps, qs = torch.sort(p, descending=True).values, torch.sort(q, descending=True).values
                k = top_k
                hp = torch.cat([ps[:k], ps.new_zeros(max(0, k - ps.shape[0]))])
                hq = torch.cat([qs[:k], qs.new_zeros(max(0, k - qs.shape[0]))])
                val = (hp - hq).abs().sum() + ((p.sum() - hp.sum()) - (q.sum() - hq.sum())).abs()
        elif mapping == "hybrid":
            tm, sm = matched
            t_free = torch.ones(vt, dtype=torch.bool)
            t_free[tm] = False
            s_free = torch.ones(vs, dtype=torch.bool)
            s_free[sm] = False
            pm, qm = p[tm].clamp_min(FLOOR_PROB), q[sm].clamp_min(FLOOR_PROB)
            d = ref_divergence(pm, qm, kind, beta=beta, alpha=alpha, mu=mu)
            u = ref_sorted_l1(p[t_free], q[s_free])
            wm, wu = hybrid_weights or (len(tm) / vt, 1 - len(tm) / vt)
            val = wm * d + wu * u
        else:
            raise ValueError(mapping)
        losses.append(val * (T**2 if scale_T2 else 1.0))
    out = torch.stack(losses) if losses else s_all.sum() * 0
    if reduction == "none":
        return out
    if reduction == "sum":
        return out.sum()
    return out.sum() / max(len(losses), 1)


def dense_projection(src, dst, w, n_src: int, n_dst: int) -> torch.Tensor:
    m = torch.zeros(n_src, n_dst, dtype=torch.float64)
    m.index_put_((torch.as_tensor(src).long(), torch.as_tensor(dst).long()), torch.as_tensor(w).double(),
                 accumulate=True)
    return m


class FakeTable:
    """A small stand-in for ``xtok_kd.vocab.VocabAlignment`` with the same attributes (for unit tests)."""

    def __init__(self, teacher_vocab_size: int, student_vocab_size: int, *, seed: int = 0, identity: bool = False,
                 unmapped: int = 3, extra: int = 5):
        g = np.random.default_rng(seed)
        vt, vs = teacher_vocab_size, student_vocab_size
        self.teacher_vocab_size, self.student_vocab_size = vt, vs
        if identity:
            self.t2s_first = torch.arange(vt)
            self.s2t_first = torch.arange(vs)
            self.exact_teacher = torch.arange(min(vt, vs))
            self.exact_student = torch.arange(min(vt, vs))
            self._extra = {"teacher_to_student": ([], [], []), "student_to_teacher": ([], [], [])}
        else:
            self.t2s_first = torch.as_tensor(g.integers(0, vs, vt))
            self.s2t_first = torch.as_tensor(g.integers(0, vt, vs))
            self.t2s_first[torch.as_tensor(g.choice(vt, unmapped, replace=False))] = -1
            self.s2t_first[torch.as_tensor(g.choice(vs, unmapped, replace=False))] = -1
            n = min(vt, vs) // 2
            self.exact_teacher = torch.as_tensor(g.choice(vt, n, replace=False))
            self.exact_student = torch.as_tensor(g.choice(vs, n, replace=False))
            self._extra = {
                "teacher_to_student": (g.integers(0, vt, extra), g.integers(0, vs, extra), g.uniform(0.1, 0.5, extra)),
                "student_to_teacher": (g.integers(0, vs, extra), g.integers(0, vt, extra), g.uniform(0.1, 0.5, extra)),
            }
        self.t2s_weight = torch.ones(vt, dtype=torch.float32)
        self.s2t_weight = torch.ones(vs, dtype=torch.float32)

    def projection(self, direction: str):
        first, weight = (self.t2s_first, self.t2s_weight) if direction == "teacher_to_student" else (
            self.s2t_first, self.s2t_weight)
        src = torch.nonzero(first >= 0).flatten()
        es, ed, ew = self._extra[direction]
        return (torch.cat([src, torch.as_tensor(es, dtype=torch.long)]),
                torch.cat([first[src], torch.as_tensor(ed, dtype=torch.long)]),
                torch.cat([weight[src], torch.as_tensor(ew, dtype=torch.float32)]))
