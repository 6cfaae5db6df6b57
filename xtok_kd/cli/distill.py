"""``xtok-kd distill``: train a student from a teacher that has another tokenizer, with ``transformers.Trainer``.

In the style of TRL's command line: the distillation options (:class:`DistillArguments`) and every
``transformers.TrainingArguments`` flag (``--learning_rate``, ``--max_steps``, ``--per_device_train_batch_size``,
``--gradient_accumulation_steps``, ``--bf16``, ``--fsdp``, ``--deepspeed``, ``--save_steps``, ``--report_to``,
``--resume_from_checkpoint`` ...; each also with dashes) are parsed by one ``HfArgumentParser``. Every option is
checked first, cheaply, and all problems are reported at once (exit status 2) before any model is loaded or any
file written. Several processes: ``accelerate launch -m xtok_kd.cli.main distill ...`` or ``torchrun
--nproc-per-node N -m xtok_kd.cli.main distill ...``.

The output folder gets the student and its tokenizer (``AutoModelForCausalLM.from_pretrained(output_dir)`` and
``AutoTokenizer.from_pretrained(output_dir)`` load them), the Trainer's checkpoints, and ``xtok_kd_distill.json``
(the command, the options and the summary), which marks the folder as a distill output that a later run may
continue (``--resume_from_checkpoint last``) or write into again.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import CliError, fail_if_any, open_tokenizer
from .distill_options import (
    _MEMORY_FIX,
    _RESUME_LAST,
    DEFAULT_HIDDEN_SIZE,
    DEFAULT_LAYERS,
    DEFAULT_MAX_LENGTH,
    MARKER,
    MARKER_FORMAT,
    DistillArguments,
    _parse,
    add_parser,
    build_arg_parser,
    check,
)

__all__ = ["DistillArguments", "add_parser", "build_arg_parser", "run"]


# ---------------------------------------------------------------------- loading
def _is_oom(err: BaseException) -> bool:
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(err, MemoryError) or (oom and isinstance(err, oom)) or (
        isinstance(err, RuntimeError) and "out of memory" in str(err).lower())


@contextmanager
def _memory_guard(stage: str) -> Iterator[None]:
    """Turn running out of memory during ``stage`` into a :class:`CliError` naming the flags that use less."""
    try:
        yield
    except Exception as err:
        if not _is_oom(err):
            raise
        first = (str(err).strip().splitlines() or [""])[0][:300]
        raise CliError(f"out of memory while {stage} ({type(err).__name__}: {first}). To use less memory: "
                       f"{_MEMORY_FIX}") from None


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:300] if lines else ''}".rstrip(": ")


def _load_model(value: str, *, role: str, dtype: str) -> Any:
    import torch

    from ..integrations import models

    with _memory_guard(f"loading the {role} {value!r}"):
        try:
            return models.load_causal_lm(value, dtype=None if dtype == "auto" else getattr(torch, dtype))
        except ImportError:
            raise
        except Exception as err:
            if _is_oom(err):
                raise
            raise CliError(f"--{role} {value!r} could not be loaded ({_first_line(err)}); pass a folder with "
                           "config.json and weights, a reachable hub id (offline: one already in the Hugging Face "
                           "cache), a .gguf file, or 'smollm2'") from None


def _model_tokenizer(value: str, *, role: str) -> Any:
    from ..integrations import models
    from ..tokenizer import load_tokenizer

    try:
        return load_tokenizer(models.load_model_tokenizer(value))
    except ImportError:
        raise
    except Exception as err:  # noqa: BLE001  (a user's folder or hub id: any failure to read it is an input problem)
        raise CliError(f"the {role}'s own tokenizer could not be loaded from {value!r} ({_first_line(err)}); pass "
                       f"--{role}-tokenizer (a folder with tokenizer.json, a hub id, or an embedded name)") from None


def _width_problem(model: Any, view: Any, *, role: str) -> str | None:
    from ..losses.module import max_padding

    emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    width = int(emb.weight.shape[0]) if emb is not None and hasattr(emb, "weight") else int(model.config.vocab_size)
    vocab = view.vocab_size
    if vocab <= width <= vocab + max_padding(vocab):
        return None
    fix = ("leave --teacher-tokenizer out (the teacher's own is the default), or pass the tokenizer it was trained with"
           if role == "teacher" else "a student trains with its own tokenizer: leave --student-tokenizer out, or start "
           "a new student for this tokenizer with --student-config tiny")
    return (f"the {role} model has {width} output rows but the {role} tokenizer {view.name!r} has {vocab} ids: it is "
            f"not the model's tokenizer; {fix}")


class _CacheRows:
    """Some rows of a :class:`~xtok_kd.teacher_cache.TeacherCache` (a train/held-out split), still a cache to the
    trainer: same settings, same pair check."""

    def __init__(self, cache: Any, indices: list[int]) -> None:
        self.cache, self.indices = cache, list(indices)
        self.top_k, self.max_length, self.loss_on = cache.top_k, cache.max_length, cache.loss_on
        self.teacher_fingerprint, self.student_fingerprint = cache.teacher_fingerprint, cache.student_fingerprint
        self.manifest = cache.manifest

    @property
    def teacher_tokenizer(self) -> Any:
        return self.cache.teacher_tokenizer

    def check_pair(self, *args: Any, **kwargs: Any) -> None:
        self.cache.check_pair(*args, **kwargs)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.cache[self.indices[i]]


def _skipped_words(skipped: dict[str, int]) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in skipped.items())


def _write_marker(output_dir: Path, record: dict[str, Any]) -> None:
    from ..vocab.files import write_atomically

    output_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(str(output_dir / MARKER), lambda tmp: Path(tmp).write_text(
        json.dumps(record, indent=1, default=str), encoding="utf-8"), replace=True)


def _last(history: list[dict[str, Any]], key: str) -> tuple[float, int] | None:
    for entry in reversed(history):
        if key in entry:
            return float(entry[key]), int(entry.get("step", 0))
    return None


# ---------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    argv = list(getattr(args, "rest", None) or [])
    try:
        opts, training_args, problems, values = _parse(argv)
    except SystemExit as done:  # --help printed
        return int(done.code or 0)
    problems += check(opts, output_dir=values.get("output_dir"),
                      resume_from_checkpoint=values.get("resume_from_checkpoint"))
    fail_if_any(problems)
    return _distill(opts, training_args, command=getattr(args, "command_line", "xtok-kd distill"), started=started)


@dataclass
class _Data:
    """What the run trains and evaluates on."""

    train: Any
    eval: Any
    cache: Any = None
    max_length: int | None = None
    loss_on: str = "all"
    skipped: dict[str, int] = field(default_factory=dict)
    eval_skipped: dict[str, int] = field(default_factory=dict)


def _load_data(opts: DistillArguments, *, seed: int, say: Any) -> _Data:
    """The examples of --data / --eval-data / --eval-fraction, or the rows of --teacher-cache."""
    from ..integrations.data import load_examples, split_held_out

    if opts.teacher_cache is not None:
        from ..teacher_cache import TeacherCache

        cache = TeacherCache(opts.teacher_cache)
        teacher = cache.manifest.get("teacher_name") or cache.manifest["teacher_tokenizer"].get("name")
        say(f"teacher cache: {opts.teacher_cache} ({len(cache)} examples, top-{cache.top_k}, teacher {teacher!r}, "
            f"max_length {cache.max_length}, loss_on {cache.loss_on})")
        data = _Data(cache, None, cache, cache.max_length, cache.loss_on)
        if opts.eval_fraction > 0:
            train_idx, eval_idx = split_held_out(list(range(len(cache))), opts.eval_fraction, seed=seed)
            data.train, data.eval = _CacheRows(cache, train_idx), _CacheRows(cache, eval_idx)
            say(f"held out {len(eval_idx)} of the cached examples for evaluation (--eval-fraction "
                f"{opts.eval_fraction})")
        return data
    loss_on = opts.loss_on or "all"
    read = {"loss_on": loss_on, "chars_per_example": opts.chars_per_example, "split": opts.data_split,
            "text_field": opts.text_field, "messages_field": opts.messages_field}
    examples, skipped = load_examples(opts.data, **read)
    say(f"data: {len(examples)} examples from {opts.data}" + (
        f"; skipped {sum(skipped.values())} bad rows ({_skipped_words(skipped)})" if skipped else ""))
    data = _Data(examples, None, None, opts.max_length or DEFAULT_MAX_LENGTH, loss_on, skipped)
    if opts.eval_data is not None:
        data.eval, data.eval_skipped = load_examples(opts.eval_data, **read)
        say(f"eval data: {len(data.eval)} examples from {opts.eval_data}" + (
            f"; skipped {sum(data.eval_skipped.values())} bad rows ({_skipped_words(data.eval_skipped)})"
            if data.eval_skipped else ""))
    elif opts.eval_fraction > 0:
        data.train, data.eval = split_held_out(examples, opts.eval_fraction, seed=seed)
        say(f"held out {len(data.eval)} of the examples for evaluation (--eval-fraction {opts.eval_fraction})")
    return data


def _load_tokenizers(opts: DistillArguments, cache: Any) -> tuple[Any, Any]:
    """``(teacher view, student view)``: given, the models' own, or the cache's (checked against the cache)."""
    if opts.student_tokenizer is not None:
        student_view = open_tokenizer(opts.student_tokenizer, role="student")
    else:
        student_view = _model_tokenizer(opts.student, role="student")
    if cache is not None:
        try:  # the student first: its fingerprint is compared without loading the cache's teacher tokenizer
            cache.check_pair(None, student_view)
        except ValueError as err:
            raise CliError(f"--student-tokenizer: {err}") from None
        if opts.teacher_tokenizer is not None:
            try:
                cache.check_pair(open_tokenizer(opts.teacher_tokenizer, role="teacher"), None)
            except ValueError as err:
                raise CliError(f"--teacher-tokenizer: {err}") from None
        return cache.teacher_tokenizer, student_view
    if opts.teacher_tokenizer is not None:
        return open_tokenizer(opts.teacher_tokenizer, role="teacher"), student_view
    if opts.teacher is not None and opts.kd_weight > 0:
        return _model_tokenizer(opts.teacher, role="teacher"), student_view
    return student_view, student_view  # --kd-weight 0: the KD term is off (no teacher side to collate)


def _add_teacher_text(opts: DistillArguments, data: _Data, teacher: Any, teacher_view: Any, *, batch_size: int,
                      device: Any, progress: bool, say: Any) -> dict[str, Any]:
    """``--add-teacher-text``: append one teacher-written row per training example to ``data.train`` (held-out rows
    get none); returns what the run's record keeps of it."""
    from ..integrations.teacher_text import generate_teacher_texts
    from .cache_teacher import teacher_text_settings

    settings = teacher_text_settings(opts)
    if getattr(teacher, "hf_device_map", None) is None:  # where the trainer puts it too
        teacher = teacher.to(device)
    started = time.perf_counter()
    try:
        with _memory_guard("the teacher was writing its text (--add-teacher-text)"):
            texts = generate_teacher_texts(teacher, teacher_view, data.train, max_length=data.max_length,
                                           batch_size=batch_size, progress=progress, **settings)
    except ValueError as err:  # chat rows: the message names the row and the fix
        raise CliError(f"--add-teacher-text: {err}") from None
    seconds = time.perf_counter() - started
    data.train = [*data.train, *texts]
    say(f"teacher text: added {len(texts)} rows written by the teacher in {seconds:.1f} s (prompt share "
        f"{settings['prompt_share']:g}, temperature {settings['temperature']:g}, seed {settings['seed']}, "
        f"max_length {data.max_length}); training on {len(data.train)} rows")
    return {"teacher_text_rows": len(texts), "teacher_text_time_s": round(seconds, 1)}


def _distill(opts: DistillArguments, training_args: Any, *, command: str, started: float) -> int:
    import torch
    from transformers import TrainerCallback

    from ..integrations.models import tiny_llama
    from ..integrations.trainer import CrossTokenizerKDTrainer

    main_process = training_args.process_index == 0
    say = print if main_process else (lambda *a, **k: None)
    output_dir = Path(training_args.output_dir).expanduser()
    resume: Any = training_args.resume_from_checkpoint or None
    if isinstance(resume, str) and resume.strip().lower() in _RESUME_LAST:
        resume = True
    data = _load_data(opts, seed=training_args.seed, say=say)
    cache, max_length, loss_on = data.cache, data.max_length, data.loss_on
    skipped, eval_skipped = data.skipped, data.eval_skipped
    teacher_view, student_view = _load_tokenizers(opts, cache)
    kd = opts.kd_weight > 0

    # models ---------------------------------------------------------------------------------------
    teacher, text_summary = None, {}
    if (kd and (cache is None or (opts.lmbda > 0 and opts.teacher is not None))  # a cache + on-policy batches
            or opts.add_teacher_text):
        # --kd-weight 0 leaves teacher_view the student's (no KD): the teacher writes with its own tokenizer
        writer_view = teacher_view if kd else (open_tokenizer(opts.teacher_tokenizer, role="teacher")
                                               if opts.teacher_tokenizer is not None
                                               else _model_tokenizer(opts.teacher, role="teacher"))
        teacher = _load_model(opts.teacher, role="teacher", dtype=opts.teacher_dtype)
        p = _width_problem(teacher, writer_view, role="teacher")
        if p:
            raise CliError(p)
        if opts.add_teacher_text:
            text_summary = _add_teacher_text(opts, data, teacher, writer_view, device=training_args.device,
                                             batch_size=training_args.per_device_train_batch_size,
                                             progress=main_process and not training_args.disable_tqdm, say=say)
        if not kd:
            say("--kd-weight 0: the teacher wrote text only (no KD term); it is not kept for training")
            teacher = None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    elif opts.teacher is not None and not kd:
        say("--kd-weight 0: plain fine-tuning; the teacher is not loaded")
    if opts.student is not None:
        student = _load_model(opts.student, role="student", dtype=opts.student_dtype)
        p = _width_problem(student, student_view, role="student")
        if p:
            raise CliError(p)
    else:
        with _memory_guard("creating the student"):
            student = tiny_llama(student_view.vocab_size, hidden_size=opts.student_hidden_size or DEFAULT_HIDDEN_SIZE,
                                 layers=opts.student_layers or DEFAULT_LAYERS,
                                 max_positions=max(2048, max_length or 0), seed=training_args.seed)
            if opts.student_dtype not in ("auto", "float32"):
                student = student.to(getattr(torch, opts.student_dtype))
    n_params = sum(p.numel() for p in student.parameters())
    say(f"student: {opts.student or f'new {opts.student_config} Llama'} ({n_params / 1e6:.1f} M parameters), "
        f"tokenizer {student_view.name!r} ({student_view.vocab_size:,} ids)")
    say("teacher: " + (f"{opts.teacher} (tokenizer {teacher_view.name!r}, {teacher_view.vocab_size:,} ids)"
                         + (" for the on-policy batches, the cache's top-k for the others" if cache is not None else "")
                         if teacher is not None else "the cache's top-k" if cache is not None and kd else "none"))

    # the trainer ----------------------------------------------------------------------------------
    class _LogLastStep(TrainerCallback):
        """Log at the last step too, so the final ce/kd are in the history whatever --logging-steps is."""

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if state.max_steps and state.global_step >= state.max_steps:
                control.should_log = True
            return control

    loss_options = ({"mapping": opts.mapping, "divergence": opts.divergence, "temperature": opts.temperature,
                     "block_rows": opts.loss_block_rows, "teacher_tail": opts.teacher_tail}
                    if kd else None)  # --kd-weight 0: no KD term, no table
    # A live teacher beside a cache (on-policy batches) gives the same top-k as the cache unless told otherwise.
    teacher_top_k = opts.teacher_top_k if cache is None else (
        opts.teacher_top_k or cache.top_k if teacher is not None else None)
    with _memory_guard("building the trainer"):
        trainer = CrossTokenizerKDTrainer(
            model=student, args=training_args, teacher_model=teacher, teacher_tokenizer=teacher_view,
            student_tokenizer=student_view, loss_options=loss_options, kd_weight=opts.kd_weight,
            ce_weight=opts.ce_weight, teacher_top_k=teacher_top_k,
            max_length=None if cache is not None else max_length, loss_on=None if cache is not None else loss_on,
            train_dataset=data.train, eval_dataset=data.eval, callbacks=[_LogLastStep()], lmbda=opts.lmbda,
            max_new_tokens=opts.max_new_tokens, on_policy_temperature=opts.on_policy_temperature,
            prompt_share=opts.prompt_share, kd_balance=opts.kd_balance)
    record: dict[str, Any] = {"format": MARKER_FORMAT, "version": 1, "command": command, "status": "running",
                              "options": asdict(opts), "output_dir": str(output_dir)}
    if trainer.is_world_process_zero():
        _write_marker(output_dir, record)

    # train ----------------------------------------------------------------------------------------
    trained_at = time.perf_counter()
    try:
        with _memory_guard("training"):
            result = trainer.train(resume_from_checkpoint=resume)
    except KeyboardInterrupt:
        say(f"xtok-kd distill: interrupted at step {trainer.state.global_step}; checkpoints so far are in "
            f"{output_dir} (resume with the same command and --resume-from-checkpoint last)")
        return 130
    train_time = time.perf_counter() - trained_at
    trainer.save_model()
    eval_metrics: dict[str, float] = {}
    if data.eval is not None:
        with _memory_guard("evaluating"):
            eval_metrics = trainer.evaluate()
    if trainer.is_world_process_zero():
        if not (output_dir / "tokenizer_config.json").is_file():
            student_view.hf.save_pretrained(str(output_dir))  # the student must reload whole
        history = trainer.state.log_history
        final = {k: _last(history, k) for k in ("loss", "ce", "kd", "aligned_share")}
        collator = trainer.data_collator
        summary = {
            "steps": trainer.state.global_step, "wall_time_s": round(time.perf_counter() - started, 1),
            "train_time_s": round(train_time, 1), "train_loss": result.metrics.get("train_loss"),
            **{f"final_{k}": v[0] for k, v in final.items() if v is not None},
            "skipped_rows": skipped, "eval_skipped_rows": eval_skipped,
            "skipped_by_collator": int(getattr(collator, "skipped", 0)), **text_summary,
            **{k: v for k, v in eval_metrics.items() if k in ("eval_loss", "eval_ce", "eval_kd")},
        }
        _write_marker(output_dir, {**record, "status": "complete", "summary": summary})
        say("")
        say(f"steps: {trainer.state.global_step}; wall time {summary['wall_time_s']:.1f} s (training "
            f"{summary['train_time_s']:.1f} s)")
        parts = [f"{k} {v[0]:.4g}" for k, v in final.items() if v is not None]
        if parts:
            say(f"final (step {next(v[1] for v in final.values() if v is not None)}): {', '.join(parts)}")
        if eval_metrics:
            say("eval: " + ", ".join(f"{k[5:]} {v:.4g}" for k, v in eval_metrics.items()
                                     if k in ("eval_loss", "eval_ce", "eval_kd")))
        at_load = {k: skipped.get(k, 0) + eval_skipped.get(k, 0) for k in {**skipped, **eval_skipped}}
        say(f"skipped examples: {sum(at_load.values())} bad rows at load"
            + (f" ({_skipped_words(at_load)})" if at_load else "")
            + f", {summary['skipped_by_collator']} by the collator")
        say(f"student: {output_dir} (AutoModelForCausalLM.from_pretrained / AutoTokenizer.from_pretrained)")
    return 0
