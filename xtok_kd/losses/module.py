"""``CrossTokenizerKDLoss``: the drop-in ``nn.Module`` (mapping x divergence, chunked, memory-bounded)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch
from torch import nn

from .divergences import DivergenceName, Reduction, check_option, reduce_rows
from .engine import Merge, build_plan, chunked_loss
from .mappings import Direction, hybrid_rows, projection_rows, uld_rows

__all__ = ["CrossTokenizerKDLoss", "KDLossOutput", "Mapping", "TeacherTopK"]

Mapping = Literal["projection", "uld", "hybrid"]


class TeacherTopK(NamedTuple):
    """A cached teacher: its ``k`` most likely next tokens per position (saves ``Vt / k`` of the memory).

    Attributes:
        ids: ``(B, Lt, k)`` int64 token ids.
        logprobs: ``(B, Lt, k)`` their log-probabilities under the full softmax at temperature 1.
    """

    ids: torch.Tensor
    logprobs: torch.Tensor


@dataclass
class KDLossOutput:
    """Result of :class:`CrossTokenizerKDLoss`.

    Attributes:
        loss: scalar (``reduction`` mean/sum) or ``(K,)`` per aligned chunk (``none``).
        metrics: plain floats: ``aligned_share`` (share of covered bytes inside chunks), ``dropped_chunks`` (chunks
            with no aligned row on a side), ``chunks`` (chunks in the loss), and the mapping's means:
            ``teacher_mass_mapped`` (projection), ``uld_bound`` (uld: the exact sorted L1 lies within this of the
            top-k value, 0 when exact), ``teacher_mass_matched`` (hybrid).
    """

    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


def _as_long(x: Any, device: Any = None) -> torch.Tensor:
    return torch.as_tensor(x, device=device).long()


class CrossTokenizerKDLoss(nn.Module):
    """Knowledge-distillation loss between a teacher and a student with different tokenizers.

    For every aligned chunk ``c`` (same bytes on both sides; see :class:`xtok_kd.sequence.Alignment`), the mapping
    makes the teacher's row ``t_c`` and the student's row ``s_c`` comparable and the divergence compares them:
    ``loss = T^2 * mean_c D(map(softmax(t_c / T)), map(softmax(s_c / T)))``.

    Args:
        table: a vocabulary table (:class:`xtok_kd.vocab.VocabAlignment` or an object with its attributes); needed by
            ``projection``, and by ``hybrid`` unless ``matched_pairs`` is given. Its index tensors become buffers.
        teacher / student: the two tokenizers (anything :func:`xtok_kd.load_tokenizer` takes), instead of
            ``table``: the table is then built once and cached (:func:`xtok_kd.vocab.get_or_build`, under
            ``$XTOK_KD_CACHE`` or the user cache directory; the path is logged).
        mapping: ``projection`` (distribution pushed through the table, divergence in one vocabulary; the default and
            the one that keeps token identity), ``uld`` (sorted-probability L1, no table needed), ``hybrid`` (GOLD:
            divergence on exactly matched columns plus sorted L1 on the rest).
        divergence: ``fkl, rkl, jsd, tvd, skl, srkl, akl, symmetric_kl`` (see :mod:`xtok_kd.losses.divergences`);
            used by ``projection`` and by the matched part of ``hybrid``.
        temperature: ``T > 0``, applied to both sides' logits; ``scale_by_temperature_sq`` multiplies by ``T^2``.
        top_k: ``uld`` only: compare the ``k`` largest probabilities plus the tail masses (bound in the metrics);
            clamped to each side's vocabulary width (a narrower row is zero-padded). None: exact full sort.
        chunk_size: aligned rows per block. Memory: about ``chunk_size * (Vt + Vs) * 4`` bytes per live buffer (32
            rows at 152k + 128k columns: 36 MB; a block keeps ~10 alive), plus one fp gradient row per student row
            the loss reads. On CPU 32 is as fast as larger blocks; on GPU raise it to 256-1024 within your budget.
        merge: multi-token chunks (``uld``/``hybrid``): ``none`` compares the aligned rows only; ``observed``
            multiplies the aligned row by the probabilities of the chunk's later actual tokens; ``bayesian``
            takes the row predicting the chunk's last token times the probabilities of the earlier ones (GOLD).
            Needs ``student_input_ids``/``teacher_input_ids``. ``projection`` renormalises, so it takes ``none``.
        direction: ``projection``: ``student_to_teacher`` (default) or ``teacher_to_student``.
        beta / alpha / mu: JSD weight, skew of skl/srkl, AKL head mass.
        reduction: ``mean`` (over aligned chunks, or divided by ``num_items_in_batch``), ``sum``, ``none``.
        matched_pairs: ``hybrid``: explicit ``(teacher_ids, student_ids)`` matched columns (e.g. GOLD's raw-string
            matches). Default: the table's canonical-byte exact pairs ``table.exact_teacher/exact_student``.
        hybrid_weights: ``(matched, unmatched)`` weights; default ``(M / Vt, 1 - M / Vt)`` as GOLD.
        hybrid_prob_floor: probabilities of matched columns are floored here before the log (GOLD: 1e-8).
        teacher_vocab_size / student_vocab_size: vocabulary widths when there is no table (default: logits widths).

    Rules: logits wider than the vocabulary (a model's padded width, e.g. Qwen2.5's 151,936 columns for 151,665 ids)
    are sliced to it before any softmax, so the padding columns never take mass and get zero gradient; narrower
    logits raise. NaN or +inf in a row the loss reads raises ``ValueError`` naming the batch index and position;
    -inf (a ruled-out token) is probability 0, accepted where the math stays finite (sorted L1, TVD) and reported
    the same way where it would make the loss NaN or infinite (a log of it). Detection costs nothing: it is read off
    the block's loss, and only then are the block's rows searched. An
    alignment with nothing to compare gives a zero loss connected to the graph (gradients are zeros). The teacher is
    a constant: no gradient reaches ``teacher_logits``. Math runs in fp32 per block (fp64 for fp64 logits); the
    gradient is returned in the student logits' dtype.
    """

    def __init__(
        self,
        *,
        table: Any = None,
        teacher: Any = None,
        student: Any = None,
        mapping: Mapping = "projection",
        divergence: DivergenceName = "fkl",
        temperature: float = 1.0,
        scale_by_temperature_sq: bool = True,
        top_k: int | None = None,
        chunk_size: int = 32,
        merge: Merge = "none",
        direction: Direction = "student_to_teacher",
        beta: float = 0.5,
        alpha: float = 0.1,
        mu: float = 0.5,
        reduction: Reduction = "mean",
        matched_pairs: tuple[Any, Any] | None = None,
        hybrid_weights: tuple[float, float] | None = None,
        hybrid_prob_floor: float = 1e-8,
        teacher_vocab_size: int | None = None,
        student_vocab_size: int | None = None,
    ) -> None:
        super().__init__()
        check_option("mapping", mapping, Mapping)
        check_option("divergence", divergence, DivergenceName)
        check_option("merge", merge, Merge)
        check_option("direction", direction, Direction)
        check_option("reduction", reduction, Reduction)
        errors = []
        if (teacher is None) != (student is None):
            errors.append("pass both teacher= and student= tokenizers (or a table=)")
        elif teacher is not None and table is not None:
            errors.append("pass either table= or teacher=/student=, not both")
        elif teacher is not None and (mapping == "projection" or (mapping == "hybrid" and matched_pairs is None)):
            from ..vocab import get_or_build

            table = get_or_build(teacher, student)
        if not temperature > 0:
            errors.append(f"temperature must be > 0, got {temperature}")
        if not (isinstance(chunk_size, int) and chunk_size >= 1):
            errors.append(f"chunk_size must be an int >= 1, got {chunk_size!r}")
        if top_k is not None and not (isinstance(top_k, int) and top_k >= 1):
            errors.append(f"top_k must be None or an int >= 1, got {top_k!r}")
        if top_k is not None and mapping != "uld":
            errors.append(f"top_k applies to mapping='uld' only (got mapping={mapping!r}); for projection pass a "
                          "TeacherTopK as teacher input")
        if not 0.0 <= beta <= 1.0:
            errors.append(f"beta must lie in [0, 1], got {beta}")
        if not 0.0 <= alpha < 1.0:
            errors.append(f"alpha must lie in [0, 1), got {alpha}")
        if not 0.0 < mu <= 1.0:
            errors.append(f"mu must lie in (0, 1], got {mu}")
        if mapping == "projection" and merge != "none":
            errors.append("merge must be 'none' with mapping='projection' (the projected rows are renormalised, "
                          "which cancels a merge factor)")
        if mapping == "projection" and table is None:
            errors.append("mapping='projection' needs table= (xtok_kd.vocab.VocabAlignment.build(teacher, student)) "
                          "or teacher= and student= tokenizers")
        if mapping == "hybrid" and table is None and matched_pairs is None:
            errors.append("mapping='hybrid' needs table= or matched_pairs=(teacher_ids, student_ids)")
        if hybrid_weights is not None and len(hybrid_weights) != 2:
            errors.append(f"hybrid_weights must be (matched, unmatched), got {hybrid_weights!r}")
        if errors:
            raise ValueError("CrossTokenizerKDLoss: " + "; ".join(errors))
        self.mapping, self.divergence, self.merge, self.direction = mapping, divergence, merge, direction
        self.temperature, self.scale_by_temperature_sq = float(temperature), scale_by_temperature_sq
        self.top_k, self.chunk_size, self.reduction = top_k, chunk_size, reduction
        self.beta, self.alpha, self.mu = beta, alpha, mu
        self.hybrid_weights, self.hybrid_prob_floor = hybrid_weights, hybrid_prob_floor
        self.teacher_vocab_size = int(table.teacher_vocab_size) if table is not None else teacher_vocab_size
        self.student_vocab_size = int(table.student_vocab_size) if table is not None else student_vocab_size
        if mapping == "projection":
            src, dst, weight = table.projection(direction)
            width = self.teacher_vocab_size if direction == "student_to_teacher" else self.student_vocab_size
            self.register_buffer("projection_src", _as_long(src))
            self.register_buffer("projection_dst", _as_long(dst))
            self.register_buffer("projection_weight", torch.as_tensor(weight, dtype=torch.float32))
            reach = torch.zeros(width, dtype=torch.bool)
            reach[self.projection_dst[self.projection_weight > 0]] = True
            if bool(reach.all()):
                support = compact_of = None
            else:  # compare on the reachable columns only: express dst as positions among them
                support = reach.nonzero().flatten()
                compact_of = torch.full((width,), -1, dtype=torch.long)
                compact_of[support] = torch.arange(support.shape[0])
                keep = reach[self.projection_dst]
                self.projection_src = self.projection_src[keep]
                self.projection_weight = self.projection_weight[keep]
                self.projection_dst = compact_of[self.projection_dst[keep]]
            src_width = self.student_vocab_size if direction == "student_to_teacher" else self.teacher_vocab_size
            if torch.unique(self.projection_src).shape[0] == self.projection_src.shape[0]:
                # At most one entry per source id: keep the dense form (no gather of source columns per block).
                dense_dst = torch.zeros(src_width, dtype=torch.long)
                dense_w = torch.zeros(src_width, dtype=torch.float32)
                dense_dst[self.projection_src] = self.projection_dst
                dense_w[self.projection_src] = self.projection_weight
                if bool((self.projection_weight == 1).all()):  # unit weights: unmapped ids go to a spare column
                    mapped = torch.zeros(src_width, dtype=torch.bool)
                    mapped[self.projection_src] = True
                    dense_dst[~mapped] = width if support is None else support.shape[0]
                    dense_w = None
                self.projection_src, self.projection_dst, self.projection_weight = None, dense_dst, dense_w
            self.register_buffer("projection_support", support)
            self.register_buffer("projection_compact_of", compact_of)
        if mapping == "hybrid":
            t_ids, s_ids = matched_pairs if matched_pairs is not None else (table.exact_teacher, table.exact_student)
            self.register_buffer("teacher_matched", _as_long(t_ids))
            self.register_buffer("student_matched", _as_long(s_ids))
            if self.teacher_matched.shape != self.student_matched.shape:
                raise ValueError(f"matched_pairs must have equal lengths, got {tuple(self.teacher_matched.shape)} "
                                 f"and {tuple(self.student_matched.shape)}")

    def extra_repr(self) -> str:
        return (f"mapping={self.mapping!r}, divergence={self.divergence!r}, temperature={self.temperature}, "
                f"top_k={self.top_k}, chunk_size={self.chunk_size}, merge={self.merge!r}, reduction={self.reduction!r}")

    # ------------------------------------------------------------------ helpers
    def _width(self, name: str, logits_width: int, vocab: int | None) -> int:
        if vocab is None:
            return logits_width
        if logits_width < vocab:
            raise ValueError(f"{name} logits have {logits_width} columns but the {name} vocabulary has {vocab} ids; "
                             "pass the full logits (a wider, padded width is fine: extra columns are sliced off)")
        return vocab

    def _block_fn(self, teacher_width: int, student_width: int, device: torch.device) -> Any:
        knobs = dict(divergence_name=self.divergence, beta=self.beta, alpha=self.alpha, mu=self.mu)
        if self.mapping == "projection":
            return functools.partial(projection_rows, src=self.projection_src, dst=self.projection_dst,
                                     weight=self.projection_weight, support=self.projection_support,
                                     compact_of=self.projection_compact_of,
                                     direction=self.direction, **knobs), ("teacher_mass_mapped",)
        if self.mapping == "uld":
            return functools.partial(uld_rows, top_k=self.top_k), ("uld_bound",)
        tm, sm = self.teacher_matched.to(device), self.student_matched.to(device)
        for name, ids, width in (("teacher", tm, teacher_width), ("student", sm, student_width)):
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= width):
                raise ValueError(f"{name} matched ids must lie in [0, {width}), got range "
                                 f"[{int(ids.min())}, {int(ids.max())}]")
        t_free = torch.ones(teacher_width, dtype=torch.bool, device=device)
        t_free[tm] = False
        s_free = torch.ones(student_width, dtype=torch.bool, device=device)
        s_free[sm] = False
        w_m, w_u = self.hybrid_weights or (tm.numel() / max(teacher_width, 1), 1.0 - tm.numel() / max(teacher_width, 1))
        return functools.partial(
            hybrid_rows, teacher_matched=tm, student_matched=sm, teacher_unmatched=t_free.nonzero().flatten(),
            student_unmatched=s_free.nonzero().flatten(), matched_weight=float(w_m), unmatched_weight=float(w_u),
            prob_floor=self.hybrid_prob_floor, **knobs,
        ), ("teacher_mass_matched",)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor | TeacherTopK,
        alignment: Any,
        *,
        student_input_ids: torch.Tensor | None = None,
        teacher_input_ids: torch.Tensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
    ) -> KDLossOutput:
        """Loss over the aligned chunks of a batch.

        Args:
            student_logits: ``(B, Ls, >= Vs)`` float (bf16/fp16/fp32/fp64).
            teacher_logits: ``(B, Lt, >= Vt)`` float, or a :class:`TeacherTopK`.
            alignment: :class:`xtok_kd.sequence.Alignment` of the batch (chunks with ``chunk_loss_mask`` False are
                left out).
            student_input_ids / teacher_input_ids: ``(B, L)`` token ids; required by ``merge`` observed/bayesian.
            num_items_in_batch: divide the summed loss by this instead of the chunk count (gradient accumulation).
        """
        topk = teacher_logits if isinstance(teacher_logits, TeacherTopK) else None
        t_logits = None if topk is not None else teacher_logits
        t_ref = topk.ids if topk is not None else t_logits
        if student_logits.dim() != 3 or t_ref.dim() != 3:
            raise ValueError(f"logits must be (B, L, V); got student {tuple(student_logits.shape)}, teacher "
                             f"{tuple(t_ref.shape)}")
        if not student_logits.is_floating_point():
            raise TypeError(f"student_logits must be floating point, got {student_logits.dtype}")
        batch = alignment.batch_size
        for name, x, length in (("student", student_logits, alignment.student_chunk.shape[1]),
                                ("teacher", t_ref, alignment.teacher_chunk.shape[1])):
            if x.shape[0] != batch or x.shape[1] < length:
                raise ValueError(f"{name} logits {tuple(x.shape)} do not fit the alignment (batch {batch}, "
                                 f"{length} {name} positions)")
        if topk is not None:
            if topk.ids.shape != topk.logprobs.shape:
                raise ValueError(f"TeacherTopK ids {tuple(topk.ids.shape)} and logprobs {tuple(topk.logprobs.shape)} "
                                 "must have the same shape")
            if self.temperature != 1.0:
                raise ValueError("a TeacherTopK holds temperature-1 log-probabilities; use temperature=1.0 or cache "
                                 "the teacher's top-k at the training temperature and pass it with temperature=1.0")
            if self.mapping == "hybrid":
                raise ValueError("mapping='hybrid' needs full teacher logits, not a TeacherTopK")
            vt = self.teacher_vocab_size
            if vt is None:
                raise ValueError("a TeacherTopK needs the teacher vocabulary size: pass table= or teacher_vocab_size=")
        else:
            vt = self._width("teacher", t_logits.shape[-1], self.teacher_vocab_size)
        vs = self._width("student", student_logits.shape[-1], self.student_vocab_size)
        if self.merge != "none" and (student_input_ids is None or teacher_input_ids is None):
            raise ValueError(f"merge={self.merge!r} needs student_input_ids and teacher_input_ids (the tokens "
                             "actually emitted inside each chunk)")
        device = student_logits.device
        rows = alignment.rows(device, only_loss=True)
        plan = build_plan(
            rows, merge=self.merge, student_length=student_logits.shape[1], teacher_length=t_ref.shape[1],
            chunk_size=self.chunk_size,
            student_input_ids=None if student_input_ids is None else student_input_ids.to(device),
            teacher_input_ids=None if teacher_input_ids is None else teacher_input_ids.to(device),
        )
        block_fn, names = self._block_fn(vt, vs, device)
        losses, per_chunk = chunked_loss(
            student_logits, t_logits, None if topk is None else (topk.ids, topk.logprobs), plan,
            block_fn=block_fn, metric_names=names, student_width=vs, teacher_width=vt, temperature=self.temperature,
        )
        if self.scale_by_temperature_sq and self.temperature != 1.0:
            losses = losses * self.temperature**2
        loss = reduce_rows(losses, reduction=self.reduction, num_items_in_batch=num_items_in_batch)
        metrics = {
            "aligned_share": float(alignment.aligned_share),
            "dropped_chunks": float(alignment.dropped_chunks),
            "chunks": float(plan.num_chunks),
        }
        means = per_chunk.mean(0) if plan.num_chunks else per_chunk.new_zeros(len(names))
        metrics.update({name: float(v) for name, v in zip(names, means.tolist())})
        return KDLossOutput(loss=loss, metrics=metrics)
