"""``CrossTokenizerKDLoss``: the drop-in ``nn.Module`` (mapping x divergence, chunked, memory-bounded)."""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Mapping as MappingABC
from typing import Any, Literal

import torch
from torch import nn

from .divergences import DivergenceName, Reduction, check_num_items, check_option, check_temperature, reduce_rows
from .engine import Merge, build_plan, chunked_loss
from .mappings import hybrid_rows, projection_rows, uld_rows
from .types import Direction, KDLossOutput, TeacherTopK

__all__ = ["CrossTokenizerKDLoss", "KDLossOutput", "Mapping", "TeacherTopK", "max_padding"]

Mapping = Literal["projection", "uld", "hybrid"]


def _as_long(x: Any, device: Any = None) -> torch.Tensor:
    return torch.as_tensor(x, device=device).long()


#: Logits may be wider than the vocabulary by up to ``max(MIN_PADDING, V // PADDING_FRACTION)`` columns.
MIN_PADDING, PADDING_FRACTION = 1024, 32


def max_padding(vocab_size: int) -> int:
    """Most padding columns accepted beyond a vocabulary of ``vocab_size`` ids: ``max(1024, vocab_size // 32)``.

    Models pad the embedding to a multiple of 64 to 1024 rows (tensor cores, tensor-parallel shards; Qwen2.5: 151,665
    ids in 151,936 or 152,064 rows, Phi-2: 50,295 in 51,200) or to a round number a few percent above (DeepSeek-LLM:
    100,015 in 102,400). Another model's vocabulary differs by far more (Llama 3's 128,256 against GPT-2's 50,257).
    """
    return max(MIN_PADDING, int(vocab_size) // PADDING_FRACTION)


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_count(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool) and int(x) >= 1


def _where(flat: int, length: int) -> str:
    return f"batch {flat // length}, position {flat % length}"


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
        temperature: ``T``, finite and ``> 0``, applied to both sides' logits; ``scale_by_temperature_sq`` multiplies by
            ``T^2``.
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
      its input ids when ``merge`` needs them and none are passed.

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
        views = None
        if (teacher is None) != (student is None):
            errors.append("pass both teacher= and student= tokenizers (or a table=)")
        elif teacher is not None and table is not None:
            errors.append("pass either table= or teacher=/student=, not both")
        elif teacher is not None and (mapping == "projection" or (mapping == "hybrid" and matched_pairs is None)):
            from ..vocab import get_or_build

            table = get_or_build(teacher, student)
        elif teacher is not None:  # no table needed: the tokenizers still give the vocabulary sizes and fingerprints
            from ..tokenizer import load_tokenizer

            views = load_tokenizer(teacher), load_tokenizer(student)
        try:
            temperature = check_temperature(temperature)
        except ValueError as err:
            errors.append(str(err))
        if not isinstance(scale_by_temperature_sq, bool):
            errors.append(f"scale_by_temperature_sq must be True or False, got {scale_by_temperature_sq!r}")
        if not _is_count(chunk_size):
            errors.append(f"chunk_size must be an int >= 1, got {chunk_size!r}")
        if top_k is not None and not _is_count(top_k):
            errors.append(f"top_k must be None or an int >= 1, got {top_k!r}")
        if top_k is not None and mapping != "uld":
            errors.append(f"top_k applies to mapping='uld' only (got mapping={mapping!r}); for projection pass a "
                          "TeacherTopK as teacher input")
        if not (_is_real(beta) and 0.0 <= beta <= 1.0):
            errors.append(f"beta must lie in [0, 1], got {beta!r}")
        if not (_is_real(alpha) and 0.0 <= alpha < 1.0):
            errors.append(f"alpha must lie in [0, 1), got {alpha!r}")
        if not (_is_real(mu) and 0.0 < mu <= 1.0):
            errors.append(f"mu must lie in (0, 1], got {mu!r}")
        if not (_is_real(hybrid_prob_floor) and 0.0 < hybrid_prob_floor < 1.0):
            errors.append(f"hybrid_prob_floor must lie in (0, 1), got {hybrid_prob_floor!r}")
        if mapping == "projection" and merge != "none":
            errors.append("merge must be 'none' with mapping='projection' (the projected rows are renormalised, "
                          "which cancels a merge factor)")
        if mapping == "projection" and table is None:
            errors.append("mapping='projection' needs table= (xtok_kd.vocab.VocabAlignment.build(teacher, student)) "
                          "or teacher= and student= tokenizers")
        if mapping == "hybrid" and table is None and matched_pairs is None:
            errors.append("mapping='hybrid' needs table= or matched_pairs=(teacher_ids, student_ids)")
        if hybrid_weights is not None:
            try:
                w = tuple(hybrid_weights)
            except TypeError:
                w = ()
            if not (len(w) == 2 and all(_is_real(x) and math.isfinite(x) and x >= 0 for x in w) and sum(w) > 0):
                errors.append(f"hybrid_weights must be (matched, unmatched), two finite numbers >= 0 not both 0, got "
                              f"{hybrid_weights!r}")
        sizes = {}
        for side, given in (("teacher", teacher_vocab_size), ("student", student_vocab_size)):
            known = None
            if table is not None:
                known = int(getattr(table, f"{side}_vocab_size"))
            elif views is not None:
                known = int(views[side == "student"].vocab_size)
            if given is not None and not _is_count(given):
                errors.append(f"{side}_vocab_size must be None or an int >= 1, got {given!r}")
            elif given is not None and known is not None and int(given) != known:
                errors.append(f"{side}_vocab_size={given} contradicts the {side} vocabulary of the "
                              f"{'table' if table is not None else 'tokenizer'} ({known} ids); leave it out")
            sizes[side] = known if known is not None else (None if given is None else int(given))
        if errors:
            raise ValueError("CrossTokenizerKDLoss: " + "; ".join(errors))
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
        self.mapping, self.divergence, self.merge, self.direction = mapping, divergence, merge, direction
        self.temperature, self.scale_by_temperature_sq = float(temperature), scale_by_temperature_sq
        self.top_k, self.chunk_size, self.reduction = top_k, chunk_size, reduction
        self.beta, self.alpha, self.mu = beta, alpha, mu
        self.hybrid_weights, self.hybrid_prob_floor = hybrid_weights, hybrid_prob_floor
        self.teacher_vocab_size: int | None = sizes["teacher"]
        self.student_vocab_size: int | None = sizes["student"]
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
    def _pair(self) -> str:
        """The table's pair for messages: names and fingerprints, or the vocabulary sizes when there is no table."""
        if self.teacher_name is not None or self.teacher_fingerprint is not None:
            return (f"{self.teacher_name!r} [{self.teacher_fingerprint}] -> {self.student_name!r} "
                    f"[{self.student_fingerprint}]")
        return f"teacher_vocab_size={self.teacher_vocab_size}, student_vocab_size={self.student_vocab_size}"

    def _width(self, name: str, logits_width: int, vocab: int | None) -> int:
        """The vocabulary width to slice ``name``'s logits to; ``ValueError`` unless the logits fit it (docstring)."""
        if vocab is None:
            return logits_width
        limit = max_padding(vocab)
        if vocab <= logits_width <= vocab + limit:
            return vocab
        other = "student" if name == "teacher" else "teacher"
        other_vocab = getattr(self, f"{other}_vocab_size")
        swapped = other_vocab is not None and other_vocab <= logits_width <= other_vocab + max_padding(other_vocab)
        hint = (f" They fit the {other} vocabulary ({other_vocab} ids): are student and teacher logits swapped? "
                "The call is loss(student_logits, teacher_logits, alignment).") if swapped else ""
        if logits_width < vocab:
            raise ValueError(f"{name} logits have {logits_width} columns but the {name} vocabulary has {vocab} ids "
                             f"(this loss: {self._pair()}); pass the full logits (a model's padded width is fine: "
                             f"extra columns are sliced off).{hint}")
        fix = ("rebuild or load the table for the pair of models you run (xtok_kd.vocab.get_or_build(teacher, "
               "student), or CrossTokenizerKDLoss(teacher=..., student=...))"
               if self.teacher_fingerprint is not None or self.teacher_name is not None
               else f"pass the right {name}_vocab_size")
        raise ValueError(
            f"{name} logits have {logits_width} columns, {logits_width - vocab} more than the {name} vocabulary of "
            f"{vocab} ids (this loss: {self._pair()}); a model pads its embedding by at most max(1024, V // 32) = "
            f"{limit} columns, so these logits come from a model with another vocabulary.{hint} Fix: {fix}; if the "
            f"width really is right, slice the logits to their first {vocab} columns yourself."
        )

    def _check_fingerprints(self, alignment: Any) -> None:
        problems = []
        for side in ("teacher", "student"):
            got = getattr(alignment, f"{side}_fingerprint", None)
            want = getattr(self, f"{side}_fingerprint")
            if got is None or want is None or str(got) == want:
                continue
            other = "student" if side == "teacher" else "teacher"
            swap = " (that is the table's " + other + ": teacher and student swapped?)" if str(got) == getattr(
                self, f"{other}_fingerprint") else ""
            problems.append(f"the alignment's {side} tokenizer has fingerprint {got}{swap}, the table's {side} "
                            f"{getattr(self, f'{side}_name')!r} has {want}")
        if problems:
            raise ValueError(
                "the alignment was made with other tokenizers than this loss's vocabulary table "
                f"({self._pair()}): " + "; ".join(problems) + ". Fix: rebuild or load the table for this pair "
                "(xtok_kd.vocab.get_or_build(teacher, student), or CrossTokenizerKDLoss(teacher=..., student=...)), "
                "or make the batch with the collator of this table's tokenizers"
            )

    @staticmethod
    def _unpack(alignment: Any, merge: str, student_input_ids: Any, teacher_input_ids: Any) -> tuple[Any, Any, Any]:
        """The Alignment (and, for a merge, input ids) out of what was passed: an Alignment or the collator's dict."""
        if isinstance(alignment, MappingABC):
            if "alignment" not in alignment:
                raise TypeError(f"alignment is a dict with keys {sorted(map(str, alignment))} but no 'alignment'; pass "
                                "the xtok_kd.sequence.Alignment (batch['alignment'] of CrossTokenizerCollator)")
            batch = alignment
            alignment = batch["alignment"]
            if merge != "none":
                student_input_ids = batch.get("student_input_ids") if student_input_ids is None else student_input_ids
                teacher_input_ids = batch.get("teacher_input_ids") if teacher_input_ids is None else teacher_input_ids
        needed = ("rows", "batch_size", "teacher_chunk", "student_chunk")
        if not all(hasattr(alignment, a) for a in needed):
            raise TypeError(f"alignment must be an xtok_kd.sequence.Alignment (or the collator's batch dict holding "
                            f"one), got {type(alignment).__name__}; pass batch['alignment'] of "
                            "CrossTokenizerCollator, or xtok_kd.sequence.align_spans(...)")
        return alignment, student_input_ids, teacher_input_ids

    @staticmethod
    def _check_ids(name: str, ids: Any, batch: int, length: int) -> torch.Tensor | None:
        if ids is None:
            return None
        if not isinstance(ids, torch.Tensor):
            try:
                ids = torch.as_tensor(ids)
            except (TypeError, ValueError, RuntimeError) as err:
                raise TypeError(f"{name} must be a (B, L) tensor of token ids, got {type(ids).__name__}") from err
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
        if ids.dim() != 2 or ids.shape[0] != batch or ids.shape[1] < length:
            raise ValueError(f"{name} has shape {tuple(ids.shape)}, but the alignment needs ({batch}, >= {length}): "
                             f"the ids the model read, one row per sample (batch['{name}'] of the collator)")
        return ids

    @staticmethod
    def _check_tokens(name: str, tokens: torch.Tensor, rows: torch.Tensor, length: int, vocab: int) -> None:
        """Merge tokens (the ids predicted by ``rows``) must lie in ``[0, vocab)``."""
        bad = (tokens < 0) | (tokens >= vocab)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            flat = int(rows[i]) + 1  # the row predicting the token is the position before it
            raise ValueError(f"{name} holds token id {int(tokens[i])} at {_where(flat, length)}, outside the "
                             f"vocabulary [0, {vocab}); merge reads the ids of every token inside a chunk: pass the "
                             "input ids the model read (not labels with -100)")

    def _check_topk(self, topk: TeacherTopK, rows: torch.Tensor, length: int, vocab: int) -> None:
        """Validate the top-k rows the loss reads (see :class:`TeacherTopK`)."""
        k = topk.ids.shape[-1]
        rows = rows.to(topk.ids.device)
        ids = topk.ids.reshape(-1, k).index_select(0, rows)
        logp = topk.logprobs.reshape(-1, k).index_select(0, rows)
        empty = ids < 0

        def where(i: int) -> str:
            return _where(int(rows[i]), length)

        over = ids >= vocab
        if bool(over.any()):
            i, j = (int(x) for x in over.nonzero()[0])
            raise ValueError(f"TeacherTopK id {int(ids[i, j])} at {where(i)}, slot {j} is outside the teacher "
                             f"vocabulary of {vocab} ids (this loss: {self._pair()}): the cache was made with another "
                             "teacher tokenizer, or use the table of this teacher. Negative ids are empty slots")
        lp = logp.masked_fill(empty, float("-inf"))
        bad = torch.isnan(lp) | (lp > 1e-3)
        if bool(bad.any()):
            i, j = (int(x) for x in bad.nonzero()[0])
            raise ValueError(f"TeacherTopK logprobs hold {lp[i, j].item()} at {where(i)}, slot {j}; they must be "
                             "log-probabilities (<= 0, from log_softmax before topk; -inf for a ruled-out token), "
                             "not NaN, +inf or raw logits")
        mass = torch.logsumexp(lp.float(), -1)
        over_one = mass > math.log1p(1e-2)
        if bool(over_one.any()):
            i = int(over_one.nonzero()[0])
            raise ValueError(f"TeacherTopK probabilities at {where(i)} sum to {mass[i].exp().item():.4g} > 1; pass "
                             "log-probabilities of the full softmax (log_softmax before topk), not raw logits")
        if k > 1:
            srt = torch.sort(ids.masked_fill(empty, -1), -1).values
            dup = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
            if bool(dup.any()):
                i, j = (int(x) for x in dup.nonzero()[0])
                raise ValueError(f"TeacherTopK ids repeat id {int(srt[i, j + 1])} at {where(i)}; each id may appear "
                                 "once per position (mark unused slots with -1)")

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
                left out), or the collator's batch dict holding it under ``"alignment"``.
            student_input_ids / teacher_input_ids: ``(B, >= L)`` integer token ids; required by ``merge``
                observed/bayesian (taken from the batch dict when that is passed).
            num_items_in_batch: divide the summed loss by this instead of the chunk count (gradient accumulation): a
                whole number ``>= 1``, int or one-element tensor.

        Raises:
            ValueError / TypeError: an input that does not fit (see the class notes); the message names the value.
        """
        alignment, student_input_ids, teacher_input_ids = self._unpack(alignment, self.merge, student_input_ids,
                                                                       teacher_input_ids)
        count = check_num_items(num_items_in_batch)
        self._check_fingerprints(alignment)
        if not isinstance(student_logits, torch.Tensor):
            raise TypeError(f"student_logits must be a (B, L, V) tensor, got {type(student_logits).__name__}")
        topk = teacher_logits if isinstance(teacher_logits, TeacherTopK) else None
        if topk is None and not isinstance(teacher_logits, torch.Tensor):
            raise TypeError(f"teacher_logits must be a (B, L, V) tensor or a TeacherTopK, got "
                            f"{type(teacher_logits).__name__}")
        if topk is not None and not (isinstance(topk.ids, torch.Tensor) and isinstance(topk.logprobs, torch.Tensor)):
            raise TypeError("TeacherTopK ids and logprobs must be tensors")
        t_logits = None if topk is not None else teacher_logits
        t_ref = topk.ids if topk is not None else t_logits
        if student_logits.dim() != 3 or t_ref.dim() != 3:
            raise ValueError(f"logits must be (B, L, V); got student {tuple(student_logits.shape)}, teacher "
                             f"{tuple(t_ref.shape)}")
        if not student_logits.is_floating_point():
            raise TypeError(f"student_logits must be floating point, got {student_logits.dtype}")
        if t_logits is not None and not t_logits.is_floating_point():
            raise TypeError(f"teacher_logits must be floating point, got {t_logits.dtype}")
        batch = alignment.batch_size
        lengths = {"student": alignment.student_chunk.shape[1], "teacher": alignment.teacher_chunk.shape[1]}
        for name, x in (("student", student_logits), ("teacher", t_ref)):
            if x.shape[0] != batch or x.shape[1] < lengths[name]:
                raise ValueError(f"{name} logits {tuple(x.shape)} do not fit the alignment: it has batch {batch} and "
                                 f"{lengths[name]} {name} positions, so they must be ({batch}, >= {lengths[name]}, V); "
                                 "pass the logits of the batch the alignment was made for")
        if topk is not None:
            if topk.ids.shape != topk.logprobs.shape:
                raise ValueError(f"TeacherTopK ids {tuple(topk.ids.shape)} and logprobs {tuple(topk.logprobs.shape)} "
                                 "must have the same shape")
            if topk.ids.is_floating_point() or topk.ids.is_complex() or topk.ids.dtype == torch.bool:
                raise TypeError(f"TeacherTopK ids must be integer token ids, got dtype {topk.ids.dtype}")
            if not topk.logprobs.is_floating_point():
                raise TypeError(f"TeacherTopK logprobs must be floating point, got {topk.logprobs.dtype}")
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
        student_input_ids = self._check_ids("student_input_ids", student_input_ids, batch, lengths["student"])
        teacher_input_ids = self._check_ids("teacher_input_ids", teacher_input_ids, batch, lengths["teacher"])
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
        if self.merge != "none":
            self._check_tokens("student_input_ids", plan.student_scalar_token, plan.student_scalar_row,
                               student_logits.shape[1], vs)
            self._check_tokens("teacher_input_ids", plan.teacher_scalar_token, plan.teacher_scalar_row,
                               t_ref.shape[1], vt)
        if topk is not None:
            self._check_topk(topk, torch.cat([plan.teacher_base, plan.teacher_scalar_row]), t_ref.shape[1], vt)
            topk = topk._replace(logprobs=topk.logprobs.masked_fill(topk.ids < 0, float("-inf")))  # empty: no mass
        block_fn, names = self._block_fn(vt, vs, device)
        losses, per_chunk = chunked_loss(
            student_logits, t_logits, None if topk is None else (topk.ids, topk.logprobs), plan,
            block_fn=block_fn, metric_names=names, student_width=vs, teacher_width=vt, temperature=self.temperature,
        )
        if self.scale_by_temperature_sq and self.temperature != 1.0:
            losses = losses * self.temperature**2
        loss = reduce_rows(losses, reduction=self.reduction, num_items_in_batch=count)
        metrics = {
            "aligned_share": float(alignment.aligned_share),
            "dropped_chunks": float(alignment.dropped_chunks),
            "chunks": float(plan.num_chunks),
        }
        means = per_chunk.mean(0) if plan.num_chunks else per_chunk.new_zeros(len(names))
        metrics.update({name: float(v) for name, v in zip(names, means.tolist())})
        return KDLossOutput(loss=loss, metrics=metrics)
