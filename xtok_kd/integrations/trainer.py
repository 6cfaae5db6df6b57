"""``CrossTokenizerKDTrainer``: a ``transformers.Trainer`` that distils a teacher into a student with another tokenizer.

Everything the Trainer already does (DDP/FSDP/DeepSpeed through ``accelerate launch`` or ``torchrun``, mixed
precision, checkpoints and resume, logging integrations) is left to it. This subclass adds:

* the data side: :class:`DistillationCollator` tokenizes each ``{"text": ...}`` or ``{"messages": [...]}`` row for
  both models and aligns them (``remove_unused_columns`` is switched off for you: the rows are raw text);
* the teacher: run in eval mode (restored before each forward) without gradients, on the student's device (unless
  it was placed with a ``device_map``), in its own dtype; or read from a teacher cache
  (:class:`xtok_kd.teacher_cache.TeacherCache` as the dataset, and as the eval dataset), in which case no teacher is
  loaded at all;
* the loss: ``ce_weight * CE(student) + kd_weight * KD``, both normalised over the whole accumulated batch (label
  tokens for CE, aligned chunks for KD, summed across processes when ``average_tokens_across_devices``), so gradient
  accumulation and data parallelism give the gradient of the big batch;
* on-policy distillation (GKD's ``lmbda``; :mod:`xtok_kd.integrations.on_policy`): a share of the micro-batches
  is replaced by text the student writes itself, graded by the live teacher;
* metrics: ``ce``, ``kd``, ``aligned_share``, ``dropped_chunks``, ``chunks``, ``seam_tokens`` and the mapping's
  means (``teacher_mass_mapped`` ...), ``on_policy`` (with ``lmbda > 0``): per-batch values averaged over the
  logging interval; ``skipped_examples``, ``dropped_messages``, ``truncated_examples``, ``generated_tokens``:
  totals over the interval. Both over all processes. Training logs carry them beside ``loss``; ``evaluate()``
  returns (and logs) them with its prefix (``eval_ce``, ``eval_kd`` ...).

Checkpoints hold the student only (the teacher is not part of ``self.model``) and the student's tokenizer;
``trainer.train(resume_from_checkpoint=True)`` resumes as with any Trainer. ``floating_point_ops`` and
``num_input_tokens_seen`` count the student's tokens. Under DDP the batches are collated in each process (never
dispatched from process 0: a batch holds an Alignment), and a process's metrics are gathered at each log.
"""

from __future__ import annotations

import math
import random
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import Trainer

from ..data import CrossTokenizerCollator
from ..losses import CrossTokenizerKDLoss, TeacherTopK
from ..tokenizer import load_tokenizer
from .on_policy import ROW_KEYS, check_on_policy_options, on_policy_batch

__all__ = ["CrossTokenizerKDTrainer", "DistillationCollator"]


class DistillationCollator:
    """Wraps :class:`~xtok_kd.CrossTokenizerCollator` for training: bad rows are skipped (and counted), never a crash
    mid-epoch; rows from a teacher cache also get their top-k padded into the batch.

    Batch keys added to the collator's: ``skipped_examples`` (int), and with cache rows ``teacher_topk_ids``
    ``(B, Lt, k)`` int64 (``-1``: empty slot), ``teacher_topk_logprobs`` ``(B, Lt, k)`` float32 and
    ``teacher_next_token_logprobs`` ``(B, Lt)`` float32 (the teacher's log-probability of its next input token; 0
    where not read). With ``keep_rows`` (set by the trainer for on-policy distillation): ``rows``, the collated rows'
    text keys (``text`` / ``messages`` / ``prompt`` / ``completion``), a list of dicts.

    Raises:
        ValueError: every row of a batch is invalid (the message names each row's problem).
    """

    def __init__(self, collator: CrossTokenizerCollator, *, keep_rows: bool = False) -> None:
        self.collator = collator
        self.keep_rows = keep_rows
        self.skipped = 0

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        rows = list(examples)
        bad: list[tuple[int, str]] = []
        try:
            batch = self.collator(rows)
        except ValueError:
            good = []
            for i, row in enumerate(rows):
                try:
                    self.collator.encode_example(row)
                    good.append(row)
                except ValueError as err:
                    bad.append((i, str(err)))
            if not bad:
                raise
            if not good:
                raise ValueError("every example of this batch is invalid: " + "; ".join(
                    f"row {i}: {why}" for i, why in bad[:5])) from None
            self.skipped += len(bad)
            warnings.warn(f"skipped {len(bad)} invalid example(s) of a batch of {len(rows)} (" + "; ".join(
                f"row {i}: {why}" for i, why in bad[:3]) + "); filter the dataset to silence this", stacklevel=2)
            rows = good
            batch = self.collator(rows)
        batch["skipped_examples"] = len(bad)
        if self.keep_rows:
            batch["rows"] = [{key: row[key] for key in ROW_KEYS if key in row} for row in rows]
        if "teacher_topk_ids" in rows[0]:
            from ..teacher_cache import collate_teacher_topk

            ids, logprobs, next_lp = collate_teacher_topk(rows, batch["teacher_input_ids"],
                                                          batch["teacher_attention_mask"])
            batch["teacher_topk_ids"], batch["teacher_topk_logprobs"] = ids, logprobs
            if next_lp is not None:
                batch["teacher_next_token_logprobs"] = next_lp
        return batch


#: ``kd_balance`` values: a fixed ``kd_weight``, or ``kd_weight * sg(CE / KD)`` per batch.
_BALANCES = ("fixed", "dynamic")
#: Metrics that count events (summed over the logging interval); every other metric is a per-batch mean (averaged).
_TOTALS = ("skipped_examples", "dropped_messages", "truncated_examples", "generated_tokens")
#: Batch keys reported as metrics.
_BATCH_METRICS = ("skipped_examples", "dropped_messages", "truncated_examples", "seam_tokens", "on_policy",
                  "generated_tokens")


def _loss_chunks(alignment: Any) -> int:
    """Chunks the KD loss reads: with an aligned row on both sides and inside the loss mask."""
    return int((alignment.has_rows & alignment.chunk_loss_mask).sum())


def _weight(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


class CrossTokenizerKDTrainer(Trainer):
    """A ``transformers.Trainer`` for a student distilled from a teacher with a different tokenizer.

    Args:
        model: the student (``AutoModelForCausalLM``-like: ``model(input_ids, attention_mask).logits``).
        args: ``TrainingArguments`` (``remove_unused_columns`` is set to False).
        teacher_model: the teacher causal LM, or None when the dataset is a teacher cache or ``kd_weight == 0``.
        teacher_tokenizer / student_tokenizer: anything :func:`xtok_kd.load_tokenizer` takes (default for the
            student: ``processing_class``; for the teacher: the cache's tokenizer when training from a cache).
        kd_loss: a ready :class:`~xtok_kd.CrossTokenizerKDLoss`; default: one built from ``loss_options`` (its keyword
            arguments, e.g. ``{"mapping": "uld"}``) with the table built once and cached on disk.
        kd_weight / ce_weight: weights of the KD term and of the student's own cross-entropy (``kd_weight=0``: plain
            fine-tuning through the same pipeline, no teacher needed).
        kd_balance: ``"fixed"`` (default): ``kd_weight`` as given; ``"dynamic"``: each batch's KD term is rescaled
            to the size of its CE term, ``kd_weight * sg(CE / KD) * KD`` (stop-gradient on the ratio, as X-Token's
            dynamic weighting), so the balance follows the two losses as they fall. Needs ``ce_weight > 0``.
        teacher_top_k: feed the loss the live teacher's top-k log-probabilities (the same values a teacher cache of
            this ``k`` holds) instead of its full logits. None: full logits.
        max_length / loss_on: the collator's options (see :class:`~xtok_kd.CrossTokenizerCollator`); a teacher cache
            fixes them (its values are the defaults, and other values are refused).
        data_collator: default :class:`DistillationCollator` of the two tokenizers.
        train_dataset / eval_dataset: rows ``{"text": str}``, ``{"messages": [...]}`` or ``{"prompt": str,
            "completion": str}`` (a list, a ``datasets`` Dataset, or a :class:`~xtok_kd.teacher_cache.TeacherCache`;
            without ``teacher_model`` and with ``kd_weight > 0`` both must be caches).
        lmbda: on-policy distillation (GKD): the probability that a training micro-batch is replaced by an
            on-policy one, drawn per micro-batch from ``args.seed``, the step and the micro-batch's index (so a run,
            and a resumed run, is reproducible). The student continues each row's prompt by sampling, the new
            ``{"prompt", "completion"}`` rows are collated again for both tokenizers, and the live teacher grades
            the completion: KD on the completion only, no cross-entropy on the student's own samples. Needs
            ``teacher_model`` (a teacher cache as ``train_dataset`` may stay: off-policy batches read it, on-policy
            ones run the live teacher, top-k'd with ``teacher_top_k`` when set), ``kd_weight > 0`` and text or
            prompt/completion rows. Costs one ``generate`` per on-policy micro-batch. 0: off (the default).
        max_new_tokens: tokens the student writes per row (default: as many as the row's own completion had; at
            most up to the student's ``max_length``).
        on_policy_temperature: the student's sampling temperature (> 0; no top-k/top-p filtering).
        prompt_share: share of a ``{"text"}`` row's student tokens kept as the prompt, in (0, 1) (a prompt/completion
            row's prompt is its ``prompt``).
        **kwargs: the rest of ``Trainer``'s arguments (callbacks, optimizers, ...).

    Raises:
        ValueError: a weight that is not a finite number ``>= 0`` (or both 0), a bad ``teacher_top_k``; ``kd_weight >
            0`` with neither a teacher nor a cache for a dataset; ``max_length`` / ``loss_on`` other than a cache's;
            a mapping that needs full logits (``hybrid``) or a temperature other than 1 with a top-k teacher (cache
            or ``teacher_top_k``); ``lmbda`` outside [0, 1], ``on_policy_temperature <= 0``, ``prompt_share`` outside
            (0, 1), a bad ``max_new_tokens``; ``lmbda > 0`` without ``teacher_model``, with ``kd_weight == 0``, or
            with chat rows; ``kd_balance`` other than ``"fixed"``/``"dynamic"``, or ``"dynamic"`` with
            ``ce_weight == 0``.
        TypeError: ``lmbda > 0`` with another data collator than :class:`DistillationCollator`.
    """

    def __init__(
        self,
        model: Any = None,
        args: Any = None,
        *,
        teacher_model: Any = None,
        teacher_tokenizer: Any = None,
        student_tokenizer: Any = None,
        kd_loss: CrossTokenizerKDLoss | None = None,
        loss_options: Mapping[str, Any] | None = None,
        kd_weight: float = 1.0,
        ce_weight: float = 1.0,
        teacher_top_k: int | None = None,
        max_length: int | None = None,
        loss_on: str | None = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        lmbda: float = 0.0,
        max_new_tokens: int | None = None,
        on_policy_temperature: float = 1.0,
        prompt_share: float = 0.5,
        kd_balance: str = "fixed",
        **kwargs: Any,
    ) -> None:
        from transformers import TrainingArguments

        self.kd_weight, self.ce_weight = _weight("kd_weight", kd_weight), _weight("ce_weight", ce_weight)
        if kd_balance not in _BALANCES:
            raise ValueError(f"kd_balance={kd_balance!r} is not one of {', '.join(map(repr, _BALANCES))}")
        if kd_balance == "dynamic" and self.ce_weight == 0:
            raise ValueError("kd_balance='dynamic' scales the KD term to the CE term's size, but ce_weight=0; use "
                             "kd_balance='fixed' or set ce_weight > 0")
        self.kd_balance = kd_balance
        self.lmbda, self.max_new_tokens, self.on_policy_temperature, self.prompt_share = check_on_policy_options(
            lmbda=lmbda, max_new_tokens=max_new_tokens, on_policy_temperature=on_policy_temperature,
            prompt_share=prompt_share)
        if self.lmbda > 0 and (teacher_model is None or self.kd_weight == 0):
            raise ValueError(f"lmbda={lmbda!r} (on-policy batches) needs a live teacher to grade the student's own "
                             "text, and a KD term: pass teacher_model= (a teacher cache as train_dataset may stay) "
                             "with kd_weight > 0, or set lmbda=0" + (f"; got kd_weight={kd_weight!r}"
                                                                     if self.kd_weight == 0 else ""))
        if self.kd_weight == 0 and self.ce_weight == 0:
            raise ValueError("kd_weight and ce_weight are both 0: nothing to train; set at least one > 0")
        if teacher_top_k is not None and (isinstance(teacher_top_k, bool) or not isinstance(teacher_top_k, int)
                                          or teacher_top_k < 1):
            raise ValueError(f"teacher_top_k must be None or an int >= 1, got {teacher_top_k!r}")
        cache = next((d for d in (train_dataset, eval_dataset) if _is_cache(d)), None)
        if cache is not None:
            teacher_tokenizer = teacher_tokenizer if teacher_tokenizer is not None else cache.teacher_tokenizer
            for name, given, cached in (("max_length", max_length, cache.max_length),
                                        ("loss_on", loss_on, cache.loss_on)):
                if given is not None and given != cached:
                    raise ValueError(f"{name}={given!r} differs from the teacher cache's {name}={cached!r} (the "
                                     f"cached top-k rows follow its tokenization); leave {name} out or rebuild the "
                                     f"cache with `xtok-kd cache-teacher ... --{name.replace('_', '-')} {given}`")
            max_length, loss_on = cache.max_length, cache.loss_on
        if student_tokenizer is None:
            student_tokenizer = processing_class
        if teacher_tokenizer is None and self.kd_weight == 0 and student_tokenizer is not None:
            teacher_tokenizer = student_tokenizer  # no teacher: the collator's teacher side mirrors the student
        if teacher_tokenizer is None or student_tokenizer is None:
            raise ValueError("pass teacher_tokenizer= and student_tokenizer= (or processing_class=); with a teacher "
                             "cache as the dataset the teacher tokenizer is the cache's")
        self.teacher_view = load_tokenizer(teacher_tokenizer)
        self.student_view = load_tokenizer(student_tokenizer)
        for d in (train_dataset, eval_dataset):
            if _is_cache(d):
                d.check_pair(self.teacher_view, self.student_view)
        uses_cache = _is_cache(train_dataset)
        if self.kd_weight > 0 and teacher_model is None:
            if train_dataset is not None and not uses_cache:
                raise ValueError("kd_weight > 0 needs teacher_model= (a causal LM) or a teacher cache as train_dataset "
                                 "(xtok_kd.teacher_cache.TeacherCache; `xtok-kd cache-teacher` writes one); "
                                 "kd_weight=0 fine-tunes on the student's own cross-entropy without a teacher")
            evals = eval_dataset.values() if isinstance(eval_dataset, Mapping) else [eval_dataset]
            if any(d is not None and not _is_cache(d) for d in evals):
                raise ValueError("kd_weight > 0 and no teacher_model=: eval_dataset must then be a teacher cache too "
                                 "(the KD term needs the teacher's predictions); pass teacher_model= or cache the "
                                 "evaluation rows with `xtok-kd cache-teacher`")
            if train_dataset is None and eval_dataset is None:
                raise ValueError("kd_weight > 0 needs teacher_model= (a causal LM) or a teacher cache as the dataset")
        if data_collator is None:
            data_collator = DistillationCollator(CrossTokenizerCollator(
                self.teacher_view, self.student_view, max_length=max_length, loss_on=loss_on or "all"))
        if self.lmbda > 0:
            _check_on_policy_data(data_collator, train_dataset)
            data_collator.keep_rows = True
        if kd_loss is None and self.kd_weight == 0:
            if loss_options:
                raise ValueError("loss_options= with kd_weight=0: there is no KD term to configure; set kd_weight > 0 "
                                 "or leave loss_options out")
        elif kd_loss is None:
            kd_loss = CrossTokenizerKDLoss(teacher=self.teacher_view, student=self.student_view,
                                           **dict(loss_options or {}))
        elif loss_options:
            raise ValueError("pass either kd_loss= or loss_options=, not both")
        if self.kd_weight > 0 and (teacher_top_k is not None or cache is not None):
            source = f"teacher_top_k={teacher_top_k}" if teacher_top_k is not None else "a teacher cache"
            method = getattr(kd_loss, "method", None)
            if method is not None and not method.accepts_topk:
                raise ValueError(f"mapping={kd_loss.mapping!r} needs the teacher's full logits, but {source} gives "
                                 "its top-k only; use another mapping (projection, uld, sinkhorn, cdm, alm), or a "
                                 "live teacher with teacher_top_k=None")
            if getattr(kd_loss, "temperature", 1.0) != 1.0:
                raise ValueError(f"{source} gives temperature-1 log-probabilities, but the loss has temperature="
                                 f"{kd_loss.temperature}; use temperature=1.0, or a live teacher with "
                                 "teacher_top_k=None")
        if args is None:
            args = TrainingArguments(output_dir="xtok_kd_output")
        if args.remove_unused_columns:
            args.remove_unused_columns = False  # rows are raw text; the collator turns them into tensors
        accelerator_config = getattr(args, "accelerator_config", None)
        if accelerator_config is not None and getattr(accelerator_config, "dispatch_batches", False) is None:
            # A batch holds an Alignment (numpy arrays), which accelerate cannot broadcast from process 0: with an
            # iterable dataset every process reads the stream and collates its own share instead.
            accelerator_config.dispatch_batches = False
        if processing_class is None:
            processing_class = self.student_view.hf  # saved with each checkpoint, so the student reloads whole
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        self.loss_is_scaled_for_ga = True  # compute_loss normalises over the whole accumulated batch itself
        self.kd_loss = None if kd_loss is None else kd_loss.to(self.args.device)
        self.teacher_top_k = teacher_top_k
        self.teacher = None
        if teacher_model is not None:
            teacher_model.eval().requires_grad_(False)
            if getattr(teacher_model, "hf_device_map", None) is None:
                teacher_model = teacher_model.to(self.args.device)
            self.teacher = teacher_model
        self._kd_metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

    # ------------------------------------------------------------------ counting for gradient accumulation
    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        """``(2,)`` int64: student label tokens and KD chunks over the accumulated micro-batches (and processes)."""
        if not batch_samples:
            return None
        tokens = sum(int((b["student_labels"][..., 1:] != -100).sum()) for b in batch_samples)
        chunks = sum(_loss_chunks(b["alignment"]) for b in batch_samples)
        counts = torch.tensor([tokens, chunks], dtype=torch.int64, device=device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            counts = self.accelerator.gather(counts).reshape(-1, 2).sum(0)
        return counts

    # ------------------------------------------------------------------ on-policy batches (lmbda)
    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device) -> tuple[list, Any]:
        """The Trainer's, with GKD's mix: each micro-batch is replaced by an on-policy one with probability ``lmbda``
        before the counts are taken, so ``num_items_in_batch`` counts the batches actually trained on."""
        if self.lmbda == 0:
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        batch_samples = []
        for index in range(num_batches):
            try:
                batch = next(epoch_iterator)
            except StopIteration:
                break
            batch_samples.append(self._mix_on_policy(batch, index))
        return batch_samples, self._get_num_items_in_batch(batch_samples, device)

    def _mix_on_policy(self, batch: dict[str, Any], index: int) -> dict[str, Any]:
        """``batch``, or with probability ``lmbda`` the on-policy batch of its rows. The draw depends on
        ``args.seed``, the global step and ``index`` only (the same in every process, and after a resume)."""
        rng = random.Random(f"xtok_kd.on_policy:{self.args.seed}:{self.state.global_step}:{index}")
        if rng.random() >= self.lmbda:
            return {**batch, "on_policy": 0, "generated_tokens": 0}
        return on_policy_batch(self.data_collator, batch["rows"], self.accelerator.unwrap_model(self.model),
                               prompt_share=self.prompt_share, max_new_tokens=self.max_new_tokens,
                               temperature=self.on_policy_temperature,
                               seed=rng.getrandbits(48) + self.args.process_index)

    # ------------------------------------------------------------------ the loss
    def _teacher_input(self, inputs: Mapping[str, Any]) -> torch.Tensor | TeacherTopK:
        if "teacher_topk_ids" in inputs:
            return TeacherTopK(inputs["teacher_topk_ids"], inputs["teacher_topk_logprobs"],
                               inputs.get("teacher_next_token_logprobs"))
        if self.teacher is None:
            raise ValueError("this batch has no cached teacher top-k and the trainer has no teacher_model")
        if self.teacher.training:  # something called .train() on it: dropout would make the targets noisy
            self.teacher.eval()
        device = next(self.teacher.parameters()).device
        with torch.no_grad():
            logits = self.teacher(input_ids=inputs["teacher_input_ids"].to(device),
                                  attention_mask=inputs["teacher_attention_mask"].to(device), use_cache=False).logits
        if self.teacher_top_k is None:
            return logits
        from ..teacher_cache import teacher_topk

        return TeacherTopK(*teacher_topk(logits, self.teacher_top_k, self.teacher_view.vocab_size,
                                         input_ids=inputs["teacher_input_ids"],
                                         attention_mask=inputs["teacher_attention_mask"]))

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | None = None) -> Any:
        outputs = model(input_ids=inputs["student_input_ids"], attention_mask=inputs["student_attention_mask"],
                        use_cache=False)
        logits = outputs.logits
        labels = inputs["student_labels"].to(logits.device)
        scale = 1.0
        if isinstance(num_items_in_batch, torch.Tensor) and num_items_in_batch.numel() == 2:
            tokens, chunks = (max(int(x), 1) for x in num_items_in_batch.tolist())
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                scale = float(self.args.world_size)  # DDP averages gradients over processes; the counts are global
        else:  # evaluation, or a caller without counts: means over this batch
            tokens, chunks = None, None
        local_tokens = max(int((labels[..., 1:] != -100).sum()), 1)
        local_chunks = max(_loss_chunks(inputs["alignment"]), 1)
        tokens, chunks = tokens or local_tokens, chunks or local_chunks
        # Next-token targets aligned with every row (the last row has none), so the logits are read as they are,
        # without the copy that slicing off their last row would make.
        targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.ce_weight > 0):  # ce_weight 0: a metric only
            ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                                                   reduction="sum") / tokens
        loss = self.ce_weight * ce if self.ce_weight > 0 else None
        mode = "train" if model.training else "eval"
        record = self._kd_metrics[mode]
        if not inputs.get("on_policy"):  # an on-policy batch has no labels: no CE to report
            record["ce"].append(float(ce.detach()) * tokens / local_tokens)  # metrics: this batch's means
        if self.kd_weight > 0:
            kd = self.kd_loss(logits, self._teacher_input(inputs), inputs, num_items_in_batch=chunks)
            weight = self.kd_weight
            if self.kd_balance == "dynamic" and not inputs.get("on_policy"):  # KD sized like CE (no gradient through)
                weight = weight * float(ce.detach()) / max(float(kd.loss.detach()), 1e-8)
            loss = weight * kd.loss if loss is None else loss + weight * kd.loss
            record["kd"].append(float(kd.loss.detach()) * chunks / local_chunks)
            for name, value in kd.metrics.items():
                record[name].append(value)
        else:
            record["aligned_share"].append(float(inputs["alignment"].aligned_share))
        for name in _BATCH_METRICS:
            if name in inputs:
                record[name].append(float(inputs[name]))
        loss = loss * scale
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> tuple[torch.Tensor, None, None]:
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def evaluation_loop(self, dataloader: Any, description: str, prediction_loss_only: bool | None = None,
                        ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval") -> Any:
        """The Trainer's loop, plus this run's KD metrics (``{prefix}_ce``, ``{prefix}_kd`` ...) in its metrics, so
        ``evaluate()`` returns and logs them and ``predict()`` returns them."""
        self._kd_metrics["eval"].clear()
        output = super().evaluation_loop(dataloader, description, prediction_loss_only=prediction_loss_only,
                                         ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        output.metrics.update({f"{metric_key_prefix}_{name}": value
                               for name, value in self._reduce_metrics("eval").items()})
        return output

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # the periodic training log (every process calls it, after gathering the loss)
            logs = {**logs, **self._reduce_metrics("train")}
        elif "train_runtime" in logs:  # end of training: what was not logged belongs to no interval
            self._kd_metrics["train"].clear()
        super().log(logs, start_time)

    def _reduce_metrics(self, mode: str) -> dict[str, float]:
        """This interval's metrics over all processes (a collective when distributed: every process calls it at the
        same point); the record is cleared."""
        record = self._kd_metrics[mode]
        local = {name: (float(sum(values)), len(values)) for name, values in record.items() if values}
        record.clear()
        parts = [local]
        if self.args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            parts = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(parts, local)
        totals: dict[str, list[float]] = {}
        for part in parts:
            for name, (total, count) in part.items():
                acc = totals.setdefault(name, [0.0, 0])
                acc[0] += total
                acc[1] += count
        return {name: total if name in _TOTALS else total / count for name, (total, count) in totals.items()}

    # ------------------------------------------------------------------ the Trainer's token counts
    @staticmethod
    def _student_inputs(inputs: Mapping[str, Any]) -> dict[str, Any]:
        """The student's ``input_ids`` / ``attention_mask`` under the names the Trainer looks for."""
        if "student_input_ids" not in inputs:
            return dict(inputs)
        return {"input_ids": inputs["student_input_ids"], "attention_mask": inputs["student_attention_mask"]}

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """The student's training FLOPs (``6 * tokens * parameters``); the teacher forward is not counted."""
        return super().floating_point_ops(self._student_inputs(inputs))

    def _track_num_input_tokens(self, inputs: dict[str, Any]) -> Any:
        """``num_input_tokens_seen`` counts student tokens."""
        return super()._track_num_input_tokens(self._student_inputs(inputs))


def _is_cache(dataset: Any) -> bool:
    return dataset is not None and hasattr(dataset, "check_pair") and hasattr(dataset, "top_k")


def _check_on_policy_data(data_collator: Any, train_dataset: Any) -> None:
    """Refuse what on-policy batches cannot be made from: another collator, chat rows (seen in the first row)."""
    if not isinstance(data_collator, DistillationCollator):
        raise TypeError(f"lmbda > 0 needs the DistillationCollator (it keeps each batch's rows to prompt the "
                         f"student with), got data_collator={type(data_collator).__name__}; leave data_collator out "
                         "or pass a DistillationCollator")
    try:
        first = train_dataset[0] if train_dataset is not None and len(train_dataset) else None
    except (TypeError, KeyError, IndexError, NotImplementedError):  # an iterable dataset: seen at its first batch
        first = None
    if isinstance(first, Mapping) and "messages" in first:
        raise ValueError("lmbda > 0 needs {'text': str} or {'prompt': str, 'completion': str} rows (the prompt the "
                         "student continues), but train_dataset[0] is a {'messages': [...]} row; render the chats "
                         "to text or split them into prompt/completion rows, or set lmbda=0")
