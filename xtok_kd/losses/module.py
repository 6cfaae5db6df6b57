"""``CrossTokenizerKDLoss``: the drop-in ``nn.Module``. It validates the options, builds the mapping once and
delegates each forward to the chunked engine (mapping x divergence, memory-bounded)."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from .divergences import check_num_items, reduce_rows
from .engine import chunked_kd
from .inputs import (
    check_fingerprints,
    check_ids,
    check_topk,
    check_width,
    max_padding,
    unpack,
)
from .mappings import MAPPINGS
from .options import LossOptions, MappingName, is_count, option_problems
from .types import KDLossOutput, TeacherTopK

__all__ = ["CrossTokenizerKDLoss", "KDLossOutput", "Mapping", "TeacherTopK", "max_padding"]

#: The ``mapping=`` names (kept under this name for existing imports).
Mapping = MappingName

_UNSET: Any = object()


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
            divergence on exactly matched columns plus sorted L1 on the rest), ``sinkhorn`` (entropic optimal
            transport between both sides' top-k plus a tail atom, lexical or embedding costs), ``cdm`` (contextual
            dynamic mapping: each side's top-k tokens matched to the other side's by exact pair or edit-distance
            candidate, divergence on the matched logits), ``alm`` (chunk likelihoods compared by a binarised
            f-divergence; no vocabulary mapping). One module each in :mod:`xtok_kd.losses.mappings`.
        divergence: ``fkl, rkl, jsd, tvd, skl, srkl, akl, symmetric_kl, dkl`` (see :mod:`xtok_kd.losses.divergences`);
            used by ``projection``, ``cdm`` and the matched part of ``hybrid``.
        temperature: ``T``, finite and ``> 0``, applied to both sides' logits; ``scale_by_temperature_sq`` multiplies by
            ``T^2``.
        top_k: ``uld``: compare the ``k`` largest probabilities plus the tail masses (bound in the metrics);
            clamped to each side's vocabulary width (a narrower row is zero-padded). None: exact full sort.
            ``sinkhorn`` / ``cdm``: each side's top-k per aligned row (default 64 / 32; a cached teacher's k at most).
        block_rows: aligned rows per block. Memory: about ``block_rows * (Vt + Vs) * 4`` bytes per live buffer (32
            rows at 152k + 128k columns: 36 MB; a block keeps ~10 alive), plus one fp gradient row per student row
            the loss reads. On CPU 32 is as fast as larger blocks; on GPU raise it to 256-1024 within your budget.
        merge: multi-token chunks (``uld``/``hybrid``): ``none`` compares the aligned rows only; ``observed``
            multiplies the aligned row by the probabilities of the chunk's later actual tokens; ``bayesian``
            takes the row predicting the chunk's last token times the probabilities of the earlier ones (GOLD).
            Needs ``student_input_ids``/``teacher_input_ids``. ``projection`` renormalises, so it takes ``none``.
        direction: ``projection``: ``student_to_teacher`` (default) or ``teacher_to_student``.
        teacher_tail: ``projection`` (``student_to_teacher``) with a top-k teacher (a cache, ``teacher_top_k``):
            True (default) compares the top-k's probabilities as they are plus one tail atom each (the teacher's mass
            outside its known top-k columns, the student's projected mass outside them), so the student is also told
            how much mass belongs outside the teacher's top-k; False renormalises both over the top-k columns (the
            behaviour before; what full logits get). It gained up to 0.2 bits/byte in ``benchmarks/quality.py``. No
            effect with full logits.
        beta / alpha / mu: JSD weight, skew of skl/srkl, AKL head mass.
        dkl_weights: ``divergence="dkl"`` (decoupled KL, Cui et al. 2024): ``(wmse, ce)`` weights; ``(0, 1)`` is
            forward KL.
        reduction: ``mean`` (over aligned chunks, or divided by ``num_items_in_batch``), ``sum``, ``none``.
        matched_pairs: ``hybrid``: explicit ``(teacher_ids, student_ids)`` matched columns (e.g. GOLD's raw-string
            matches). Default: the table's canonical-byte exact pairs ``table.exact_teacher/exact_student``.
        hybrid_weights: ``(matched, unmatched)`` weights; default ``(M / Vt, 1 - M / Vt)`` as GOLD.
        hybrid_prob_floor: probabilities of matched columns are floored here before the log (GOLD: 1e-8).
        cost: ``sinkhorn``: ``lexical`` (default; 0 for an exact pair, ``1 - similarity`` for a table neighbour or a
            projection's first piece, 1 otherwise) or ``embedding`` (``1 - cosine`` of ``teacher_embeddings``).
        epsilon / sinkhorn_max_iter / sinkhorn_tol: ``sinkhorn``: entropic regularisation (> 0), iterations and
            tolerance; rows that did not converge are counted in the metric ``sinkhorn_unconverged`` and warned about.
        sequence_weight: ``sinkhorn``: weight of the sequence-level transport term (MultiLevelOT; 0 = off): every
            chunk of a sequence carries this times the sequence's value (metric ``sequence_ot``).
        sinkhorn_support: ``sinkhorn``: the student's atoms, ``top_k`` (default: its top-k) or ``union`` (plus the
            tokens the teacher's top-k map to); both gained little in ``benchmarks/quality.py``.
        unbiased: ``sinkhorn``: the Sinkhorn divergence ``W(P,Q) - W(P,P)/2 - W(Q,Q)/2`` (0 for identical inputs).
        teacher_embeddings: ``sinkhorn`` with ``cost="embedding"``: the teacher's output embeddings ``(Vt, d)``.
        cdm_max_distance: ``cdm``: largest normalised edit distance of a candidate pair (CDM: about 0.1).
        alm_divergence: ``alm``: ``binary_kl`` (default) or ``abs_diff`` (absolute difference of log-likelihoods).
        chunk_size: deprecated name of ``block_rows`` ("chunk" is the glossary's byte run); still accepted, with a
            ``FutureWarning``.
        teacher_vocab_size / student_vocab_size: vocabulary sizes when there is no table (default: the ``teacher=`` /
            ``student=`` tokenizers' sizes, else the logits' widths); with a table they must equal its sizes.

    Rules:

    * Pairing. A table carries both tokenizers' fingerprints; an alignment from the collator carries those of the
      tokenizers it was made with (``teacher_fingerprint`` / ``student_fingerprint``, None when unknown). A known
      fingerprint that differs from the table's raises ``ValueError`` naming both and the side: rebuild or load the
      table for this pair, or use the collator of the table's tokenizers.
    * Widths. Logits ``W`` columns wide for a vocabulary of ``V`` ids are accepted iff ``V <= W <= V +
      max(1024, V // 32)`` (:func:`max_padding`): a model's padded embedding (Qwen2.5: 151,936 columns for 151,665
      ids, 271 extra), sliced to ``V`` before any softmax, so padding columns never take mass and get zero gradient.
      Narrower logits, or logits wider than that (another model: 128,256 or 151,936 columns against GPT-2's 50,257),
      raise ``ValueError`` naming both widths, the table's pair and the fix. Checked on both sides for every mapping
      against the table's sizes, else ``teacher_vocab_size`` / ``student_vocab_size``, else the sizes of the
      ``teacher=`` / ``student=`` tokenizers. With none of these (``uld``, or ``hybrid`` with ``matched_pairs``) the
      logits' widths are taken as the vocabularies: nothing can be checked and padding columns take part (pass the
      sizes). A :class:`TeacherTopK` is checked by its ids (``< Vt``; negative ids are empty slots).
    * Values. ``-inf`` logits (ruled-out tokens), on either side, are probability 0 with ``0 log 0 = 0``: values and
      gradients stay free of NaN under every mapping and divergence. Where the divergence itself is infinite (``fkl``
      where the student rules out a token the teacher gives mass; ``rkl`` the other way round; ``symmetric_kl``,
      ``akl``) the chunk's loss is ``+inf``, as the mathematics says, and that chunk gives no gradient (``jsd``,
      ``tvd``, ``skl``, ``srkl`` and ``uld`` stay finite). A chunk to which no teacher mass reaches the comparison
      (all of it ruled out there) gives 0. NaN or ``+inf`` in a row the loss reads, or a row that is ``-inf`` in
      every column, raises ``ValueError`` naming the side, batch index and position; detection is read off the
      block's loss, and only then are its rows searched.
    * Arguments are checked on entry and a bad one raises naming its value: ``temperature`` must be finite and
      ``> 0``; ``num_items_in_batch`` a whole number ``>= 1`` (int or one-element tensor); input ids ``(B, >= L)``
      integers inside the vocabulary. ``alignment`` may be the collator's batch dict: its ``"alignment"`` is used, and
      its input ids when ``merge`` or ``alm`` needs them and none are passed.

    An alignment with nothing to compare gives a zero loss connected to the graph (gradients are zeros). The teacher
    is a constant: no gradient reaches ``teacher_logits`` (which may sit on another device). Math runs in fp32 per
    block (fp64 for fp64 logits); the gradient is returned in the student logits' dtype.
    """

    def __init__(
        self,
        *,
        table: Any = None,
        teacher: Any = None,
        student: Any = None,
        mapping: str = "projection",
        divergence: str = "fkl",
        temperature: float = 1.0,
        scale_by_temperature_sq: bool = True,
        top_k: int | None = None,
        block_rows: int = 32,
        merge: str = "none",
        direction: str = "student_to_teacher",
        beta: float = 0.5,
        alpha: float = 0.1,
        mu: float = 0.5,
        reduction: str = "mean",
        matched_pairs: tuple[Any, Any] | None = None,
        hybrid_weights: tuple[float, float] | None = None,
        hybrid_prob_floor: float = 1e-8,
        cost: str = "lexical",
        epsilon: float = 0.1,
        sinkhorn_max_iter: int = 300,
        sinkhorn_tol: float = 1e-4,
        unbiased: bool = False,
        teacher_embeddings: Any = None,
        cdm_max_distance: float = 0.1,
        alm_divergence: str = "binary_kl",
        dkl_weights: tuple[float, float] = (0.0, 1.0),
        sequence_weight: float = 0.0,
        sinkhorn_support: str = "top_k",
        teacher_tail: bool = True,
        teacher_vocab_size: int | None = None,
        student_vocab_size: int | None = None,
        chunk_size: Any = _UNSET,
    ) -> None:
        super().__init__()
        errors = []
        if chunk_size is not _UNSET:
            warnings.warn("CrossTokenizerKDLoss(chunk_size=...) is deprecated: it counts aligned rows per block, so it "
                          "is now called block_rows (a 'chunk' is the glossary's byte run); pass block_rows=",
                          FutureWarning, stacklevel=2)
            if block_rows != 32 and block_rows != chunk_size:
                errors.append(f"pass block_rows only (chunk_size={chunk_size!r} is its deprecated name, and they "
                              f"differ: block_rows={block_rows!r})")
            block_rows = chunk_size
            if not is_count(block_rows):
                errors.append(f"chunk_size (now block_rows) must be an int >= 1, got {chunk_size!r}")
        options = LossOptions(
            mapping=mapping, divergence=divergence, temperature=temperature,
            scale_by_temperature_sq=scale_by_temperature_sq, top_k=top_k, block_rows=block_rows, merge=merge,
            direction=direction, beta=beta, alpha=alpha, mu=mu, reduction=reduction, matched_pairs=matched_pairs,
            hybrid_weights=hybrid_weights, hybrid_prob_floor=hybrid_prob_floor, cost=cost, epsilon=epsilon,
            sinkhorn_max_iter=sinkhorn_max_iter, sinkhorn_tol=sinkhorn_tol, unbiased=unbiased,
            teacher_embeddings=teacher_embeddings, cdm_max_distance=cdm_max_distance, alm_divergence=alm_divergence,
            dkl_weights=dkl_weights, sequence_weight=sequence_weight, sinkhorn_support=sinkhorn_support,
            teacher_tail=teacher_tail,
        )
        errors += option_problems(options)
        method = MAPPINGS.get(mapping)
        if method is None:
            errors.insert(0, f"mapping={mapping!r} is not supported; choose one of {', '.join(map(repr, MAPPINGS))}")
        views = None
        if (teacher is None) != (student is None):
            errors.append("pass both teacher= and student= tokenizers (or a table=)")
        elif teacher is not None and table is not None:
            errors.append("pass either table= or teacher=/student=, not both")
        elif teacher is not None and method is not None and method.wants_table(options):
            from ..vocab import get_or_build

            table = get_or_build(teacher, student)
        elif teacher is not None:  # no table needed: the tokenizers still give the vocabulary sizes and fingerprints
            from ..tokenizer import load_tokenizer

            views = load_tokenizer(teacher), load_tokenizer(student)
        if method is not None:
            errors += method.problems(options, table)
        sizes = {}
        for side, given in (("teacher", teacher_vocab_size), ("student", student_vocab_size)):
            known = None
            if table is not None:
                known = int(getattr(table, f"{side}_vocab_size"))
            elif views is not None:
                known = int(views[side == "student"].vocab_size)
            if given is not None and not is_count(given):
                errors.append(f"{side}_vocab_size must be None or an int >= 1, got {given!r}")
            elif given is not None and known is not None and int(given) != known:
                errors.append(f"{side}_vocab_size={given} contradicts the {side} vocabulary of the "
                              f"{'table' if table is not None else 'tokenizer'} ({known} ids); leave it out")
            sizes[side] = known if known is not None else (None if given is None else int(given))
        if errors:
            raise ValueError("CrossTokenizerKDLoss: " + "; ".join(dict.fromkeys(errors)))
        # Who the vocabularies belong to (None: unknown), for the pairing check and for messages.
        for side in ("teacher", "student"):
            if table is not None:
                name, fingerprint = getattr(table, f"{side}_name", None), getattr(table, f"{side}_fingerprint", None)
            elif views is not None:
                name, fingerprint = views[side == "student"].name, views[side == "student"].fingerprint
            else:
                name = fingerprint = None
            setattr(self, f"{side}_name", None if name is None else str(name))
            setattr(self, f"{side}_fingerprint", None if fingerprint is None else str(fingerprint))
        self.options = options
        self.mapping, self.divergence, self.merge, self.direction = mapping, divergence, merge, direction
        self.temperature, self.scale_by_temperature_sq = float(temperature), scale_by_temperature_sq
        self.top_k, self.block_rows, self.reduction = top_k, block_rows, reduction
        self.beta, self.alpha, self.mu = beta, alpha, mu
        self.teacher_vocab_size: int | None = sizes["teacher"]
        self.student_vocab_size: int | None = sizes["student"]
        self.method = method(options)
        self._buffer_names = []
        for name, value in self.method.buffers(table, self.teacher_vocab_size, self.student_vocab_size).items():
            self.register_buffer(name, value, persistent=name not in self.method.transient)
            self._buffer_names.append(name)

    @property
    def chunk_size(self) -> int:
        """Deprecated name of :attr:`block_rows`."""
        return self.block_rows

    def extra_repr(self) -> str:
        return (f"mapping={self.mapping!r}, divergence={self.divergence!r}, temperature={self.temperature}, "
                f"top_k={self.top_k}, block_rows={self.block_rows}, merge={self.merge!r}, "
                f"reduction={self.reduction!r}")

    def _pair(self) -> str:
        """The table's pair for messages: names and fingerprints, or the vocabulary sizes when there is no table."""
        if self.teacher_name is not None or self.teacher_fingerprint is not None:
            return (f"{self.teacher_name!r} [{self.teacher_fingerprint}] -> {self.student_name!r} "
                    f"[{self.student_fingerprint}]")
        return f"teacher_vocab_size={self.teacher_vocab_size}, student_vocab_size={self.student_vocab_size}"

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
                left out), or the collator's batch dict holding it under ``"alignment"``.
            student_input_ids / teacher_input_ids: ``(B, >= L)`` integer token ids; required by ``merge``
                observed/bayesian and by ``alm`` (taken from the batch dict when that is passed).
            num_items_in_batch: divide the summed loss by this instead of the chunk count (gradient accumulation): a
                whole number ``>= 1``, int or one-element tensor.

        Raises:
            ValueError / TypeError: an input that does not fit (see the class notes); the message names the value.
        """
        method = self.method
        wants_ids = (method.plan_merge or self.merge) != "none" or method.needs_loglik
        alignment, student_input_ids, teacher_input_ids = unpack(alignment, wants_ids, student_input_ids,
                                                                 teacher_input_ids)
        count = check_num_items(num_items_in_batch)
        check_fingerprints(self, alignment)
        if not isinstance(student_logits, torch.Tensor):
            raise TypeError(f"student_logits must be a (B, L, V) tensor, got {type(student_logits).__name__}")
        topk = teacher_logits if isinstance(teacher_logits, TeacherTopK) else None
        if topk is None and not isinstance(teacher_logits, torch.Tensor):
            raise TypeError(f"teacher_logits must be a (B, L, V) tensor or a TeacherTopK, got "
                            f"{type(teacher_logits).__name__}")
        if topk is not None and not (isinstance(topk.ids, torch.Tensor) and isinstance(topk.logprobs, torch.Tensor)):
            raise TypeError("TeacherTopK ids and logprobs must be tensors")
        t_ref = topk.ids if topk is not None else teacher_logits
        if student_logits.dim() != 3 or t_ref.dim() != 3:
            raise ValueError(f"logits must be (B, L, V); got student {tuple(student_logits.shape)}, teacher "
                             f"{tuple(t_ref.shape)}")
        if not student_logits.is_floating_point():
            raise TypeError(f"student_logits must be floating point, got {student_logits.dtype}")
        if topk is None and not teacher_logits.is_floating_point():
            raise TypeError(f"teacher_logits must be floating point, got {teacher_logits.dtype}")
        batch = alignment.batch_size
        lengths = {"student": alignment.student_chunk.shape[1], "teacher": alignment.teacher_chunk.shape[1]}
        for name, x in (("student", student_logits), ("teacher", t_ref)):
            if x.shape[0] != batch or x.shape[1] < lengths[name]:
                raise ValueError(f"{name} logits {tuple(x.shape)} do not fit the alignment: it has batch {batch} and "
                                 f"{lengths[name]} {name} positions, so they must be ({batch}, >= {lengths[name]}, V); "
                                 "pass the logits of the batch the alignment was made for")
        if topk is not None:
            vt = self._topk_width(topk, t_ref)
        else:
            vt = check_width(self, "teacher", teacher_logits.shape[-1], self.teacher_vocab_size)
        vs = check_width(self, "student", student_logits.shape[-1], self.student_vocab_size)
        student_input_ids = check_ids("student_input_ids", student_input_ids, batch, lengths["student"])
        teacher_input_ids = check_ids("teacher_input_ids", teacher_input_ids, batch, lengths["teacher"])
        if wants_ids and (student_input_ids is None or teacher_input_ids is None):
            need = f"merge={self.merge!r}" if self.merge != "none" else f"mapping={self.mapping!r}"
            raise ValueError(f"{need} needs student_input_ids and teacher_input_ids (the tokens actually emitted "
                             "inside each chunk)")
        check = None
        if topk is not None:
            def check(rows: torch.Tensor) -> None:
                check_topk(self, topk, rows, t_ref.shape[1], vt)

            topk = topk._replace(logprobs=topk.logprobs.masked_fill(topk.ids < 0, float("-inf")))  # empty: no mass
        device = student_logits.device
        rows = alignment.rows(device, only_loss=True)
        buffers = {name: getattr(self, name) for name in self._buffer_names}
        losses, per_chunk = chunked_kd(
            student_logits, topk if topk is not None else teacher_logits, rows, mapping=method, buffers=buffers,
            merge=self.merge, block_rows=self.block_rows, student_width=vs, teacher_width=vt,
            temperature=self.temperature, student_input_ids=student_input_ids, teacher_input_ids=teacher_input_ids,
            check_teacher_rows=check,
        )
        extra = method.sequence_losses(student_logits, topk if topk is not None else teacher_logits, alignment,
                                       student_width=vs, teacher_width=vt, temperature=self.temperature)
        seq_metrics: dict[str, float] = {}
        if extra is not None:
            per_sequence, seq_metrics = extra
            losses = losses + per_sequence[rows.sample.to(per_sequence.device)].to(losses.dtype)
        if self.scale_by_temperature_sq and self.temperature != 1.0:
            losses = losses * self.temperature**2
        loss = reduce_rows(losses, reduction=self.reduction, num_items_in_batch=count)
        names = method.metric_names
        metrics = {
            "aligned_share": float(alignment.aligned_share),
            "dropped_chunks": float(alignment.dropped_chunks),
            "chunks": float(losses.shape[0]),
        }
        means = method.summarise(per_chunk) if losses.shape[0] else per_chunk.new_zeros(len(names))
        metrics.update({name: float(v) for name, v in zip(names, means.tolist())})
        metrics.update(seq_metrics)
        return KDLossOutput(loss=loss, metrics=metrics)

    def _topk_width(self, topk: TeacherTopK, t_ref: torch.Tensor) -> int:
        """Validate a :class:`TeacherTopK`'s form against this loss; returns the teacher vocabulary size."""
        if topk.ids.shape != topk.logprobs.shape:
            raise ValueError(f"TeacherTopK ids {tuple(topk.ids.shape)} and logprobs {tuple(topk.logprobs.shape)} "
                             "must have the same shape")
        if topk.ids.is_floating_point() or topk.ids.is_complex() or topk.ids.dtype == torch.bool:
            raise TypeError(f"TeacherTopK ids must be integer token ids, got dtype {topk.ids.dtype}")
        if not topk.logprobs.is_floating_point():
            raise TypeError(f"TeacherTopK logprobs must be floating point, got {topk.logprobs.dtype}")
        nxt = topk.next_token_logprobs
        if nxt is not None and (not isinstance(nxt, torch.Tensor) or not nxt.is_floating_point()
                                or tuple(nxt.shape) != tuple(t_ref.shape[:2])):
            got = tuple(nxt.shape) if isinstance(nxt, torch.Tensor) else type(nxt).__name__
            raise ValueError(f"TeacherTopK next_token_logprobs must be a float tensor of shape "
                             f"{tuple(t_ref.shape[:2])} (one log-probability per teacher position), got {got}")
        if self.temperature != 1.0:
            raise ValueError("a TeacherTopK holds temperature-1 log-probabilities; use temperature=1.0 or cache "
                             "the teacher's top-k at the training temperature and pass it with temperature=1.0")
        if not self.method.accepts_topk:
            raise ValueError(f"mapping={self.mapping!r} needs full teacher logits, not a TeacherTopK")
        if self.teacher_vocab_size is None:
            raise ValueError("a TeacherTopK needs the teacher vocabulary size: pass table= or teacher_vocab_size=")
        return self.teacher_vocab_size
