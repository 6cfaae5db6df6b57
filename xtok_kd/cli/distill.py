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
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from . import CliError, check_int, fail_if_any, open_tokenizer, tokenizer_problem

__all__ = ["DistillArguments", "add_parser", "build_arg_parser", "run"]

MARKER = "xtok_kd_distill.json"
MARKER_FORMAT = "xtok_kd.distill"
DTYPES = ("auto", "float32", "bfloat16", "float16")
STUDENT_CONFIGS = ("tiny",)
LOSS_ON = ("all", "assistant")
DEFAULT_MAX_LENGTH = 512
DEFAULT_HIDDEN_SIZE, DEFAULT_LAYERS = 64, 2
_RESUME_LAST = ("true", "last", "latest")
_MEMORY_FIX = ("--teacher-cache DIR (run `xtok-kd cache-teacher` first: no teacher in memory while training), "
               "--teacher-dtype bfloat16, a smaller --per-device-train-batch-size (raise "
               "--gradient-accumulation-steps to keep the batch), a smaller --max-length, --gradient-checkpointing")


def _mappings() -> tuple[str, ...]:
    from typing import get_args

    from ..losses.module import Mapping

    return get_args(Mapping)


def _divergences() -> tuple[str, ...]:
    from typing import get_args

    from ..losses.divergences import DivergenceName

    return get_args(DivergenceName)


@dataclass
class DistillArguments:
    """The distillation options of ``xtok-kd distill`` (the Trainer's are ``transformers.TrainingArguments``)."""

    _argument_group_name: ClassVar[str] = "distillation options (xtok-kd)"

    teacher: str | None = field(default=None, metadata={"help": (
        "teacher model: a hub id, a folder with config.json and weights, a .gguf file, or the embedded 'smollm2'. "
        "Not needed with --teacher-cache or --kd-weight 0")})
    teacher_tokenizer: str | None = field(default=None, metadata={"help": (
        "teacher tokenizer (default: the teacher's own; with --teacher-cache: the cache's): a folder with "
        "tokenizer.json, a hub id, or an embedded name (qwen2.5, mistral, gpt2)")})
    teacher_cache: str | None = field(default=None, metadata={"help": (
        "a teacher cache folder written by `xtok-kd cache-teacher`: the teacher's top-k and the examples, so no "
        "teacher is loaded and --data is not needed")})
    teacher_dtype: str = field(default="auto", metadata={"help": (
        f"dtype the teacher is loaded in: {', '.join(DTYPES)} (auto: the checkpoint's own; float32 for .gguf)")})
    teacher_top_k: int | None = field(default=None, metadata={"help": (
        "feed the loss the live teacher's top-k log-probabilities instead of its full logits (what a cache of this k "
        "holds); default: full logits")})
    student: str | None = field(default=None, metadata={"help": (
        "the student to start from: a hub id, a folder, or a .gguf file (or use --student-config)")})
    student_config: str | None = field(default=None, metadata={"help": (
        "start a new student from scratch instead of --student: 'tiny' (a small Llama sized by --student-hidden-size "
        "and --student-layers, for tests and demos); needs --student-tokenizer")})
    student_hidden_size: int | None = field(default=None, metadata={"help": (
        f"--student-config tiny: hidden size, a multiple of 8 ({DEFAULT_HIDDEN_SIZE})")})
    student_layers: int | None = field(default=None, metadata={"help": (
        f"--student-config tiny: number of layers ({DEFAULT_LAYERS})")})
    student_tokenizer: str | None = field(default=None, metadata={"help": (
        "student tokenizer (default: the student's own; required with --student-config): a folder with "
        "tokenizer.json, a hub id, or an embedded name (qwen2.5, mistral, gpt2)")})
    student_dtype: str = field(default="float32", metadata={"help": (
        f"dtype the student is loaded and trained in: {', '.join(DTYPES)} (keep float32 and add --bf16 for mixed "
        "precision)")})
    data: str | None = field(default=None, metadata={"help": (
        "training data: a .txt file (cut into passages at blank lines), a .jsonl/.json file with 'text' or "
        "'messages' rows, a folder of .txt files, a .parquet/.csv file, or a `datasets` name. Not needed with "
        "--teacher-cache")})
    data_split: str | None = field(default=None, metadata={"help": "`datasets` split of --data/--eval-data (train)"})
    text_field: str = field(default="text", metadata={"help": "row field holding the text (.jsonl/datasets)"})
    messages_field: str = field(default="messages", metadata={"help": (
        "row field holding the conversation, a list of {role, content} (.jsonl/datasets)")})
    chars_per_example: int = field(default=2000, metadata={"help": "plain text: characters per passage, about"})
    eval_data: str | None = field(default=None, metadata={"help": (
        "held-out data (same forms as --data), evaluated at the end (and during training with --eval_strategy)")})
    eval_fraction: float = field(default=0.0, metadata={"help": (
        "hold out this fraction of the training examples for evaluation instead of --eval-data, in [0, 1) "
        "(0: no evaluation)")})
    mapping: str = field(default="projection", metadata={"help": (
        "how the two vocabularies are compared: projection, uld or hybrid")})
    divergence: str = field(default="fkl", metadata={"help": (
        "divergence: fkl, rkl, jsd, tvd, skl, srkl, akl, symmetric_kl")})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature of both models in the KD loss"})
    kd_weight: float = field(default=1.0, metadata={"help": "weight of the distillation loss (0: plain fine-tuning)"})
    ce_weight: float = field(default=1.0, metadata={"help": "weight of the student's own next-token cross-entropy"})
    max_length: int | None = field(default=None, metadata={"help": (
        f"tokens per example and side, longer ones are truncated ({DEFAULT_MAX_LENGTH}; with --teacher-cache: the "
        "cache's)")})
    loss_on: str | None = field(default=None, metadata={"help": (
        "which content counts for the loss: all, or assistant (chat rows: assistant turns only) (all; with "
        "--teacher-cache: the cache's)")})
    overwrite_output_dir: bool = field(default=False, metadata={"help": (
        "write into an --output-dir that holds other files (files of the same names are replaced); an earlier "
        "distill output needs no flag")})


# ---------------------------------------------------------------------- parsing
def add_parser(sub: argparse._SubParsersAction) -> None:
    # Everything after `distill` is kept as is and parsed by HfArgumentParser in run(): no option prefix here, so
    # argparse classifies no word as an option (the Trainer's flags are only known there).
    p = sub.add_parser("distill", add_help=False, prefix_chars="\0",
                       help="train a student from a teacher with another tokenizer (Trainer flags work; --help)",
                       description="Run `xtok-kd distill --help` for the options.")
    p.add_argument("rest", nargs="*", help=argparse.SUPPRESS)


def build_arg_parser() -> Any:
    """The ``HfArgumentParser`` of :class:`DistillArguments` and ``TrainingArguments``; its errors raise
    :class:`CliError`."""
    from transformers import HfArgumentParser, TrainingArguments

    class _Parser(HfArgumentParser):
        def error(self, message: str) -> None:  # type: ignore[override]
            raise CliError(f"{message}; run `xtok-kd distill --help` for the options")

    return _Parser(
        (DistillArguments, TrainingArguments), prog="xtok-kd distill",
        usage="xtok-kd distill --output-dir DIR (--teacher MODEL --data SOURCE | --teacher-cache DIR)\n"
              "                       (--student MODEL | --student-config tiny --student-tokenizer TOKENIZER)\n"
              "                       [distillation options] [TrainingArguments options]",
        description="Distil a teacher into a student that has another tokenizer, with transformers.Trainer. Every "
                    "TrainingArguments flag works (with underscores or dashes).",
        epilog="examples:\n"
               "  xtok-kd distill --teacher Qwen/Qwen2.5-0.5B-Instruct --student HuggingFaceTB/SmolLM2-135M \\\n"
               "      --data corpus.txt --output-dir out --max-steps 1000 --bf16\n"
               "  xtok-kd distill --teacher smollm2 --student-config tiny --student-tokenizer mistral \\\n"
               "      --data corpus.txt --eval-fraction 0.05 --output-dir out --max-steps 100\n"
               "  xtok-kd distill --teacher-cache cache/ --student-config tiny --student-tokenizer mistral \\\n"
               "      --output-dir out --max-steps 100      # cache from `xtok-kd cache-teacher`\n"
               "  xtok-kd distill ... --output-dir out --resume-from-checkpoint last\n"
               "  accelerate launch -m xtok_kd.cli.main distill ...   # several GPUs (or torchrun -m)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _unknown(parser: Any, unknown: list[str]) -> list[str]:
    from difflib import get_close_matches

    options = [s for action in parser._actions for s in action.option_strings]
    out = []
    after_option = False
    for word in unknown:
        if not word.startswith("-") and after_option:  # the value of the unknown option just reported
            after_option = False
            continue
        after_option = word.startswith("-") and "=" not in word
        if word.startswith("-"):
            name = word.split("=", 1)[0]
            close = get_close_matches(name, options, n=1, cutoff=0.75)
            hint = f" (did you mean {close[0]}?)" if close else ""
            out.append(f"unknown option {name}{hint}; run `xtok-kd distill --help` for the options")
        else:
            out.append(f"unexpected argument {word!r}: options take the form --name value")
    return out


def _parse(argv: list[str]) -> tuple[DistillArguments, Any, list[str], dict[str, Any]]:
    """``(options, training_args or None, problems, parsed values)``; ``--help`` raises SystemExit(0)."""
    from transformers import TrainingArguments

    parser = build_arg_parser()
    namespace, unknown = parser.parse_known_args(argv)
    problems = _unknown(parser, unknown)
    values = vars(namespace)
    opts = DistillArguments(**{f.name: values[f.name] for f in fields(DistillArguments) if f.name in values})
    training_args = None
    try:
        training_args = TrainingArguments(**{f.name: values[f.name] for f in fields(TrainingArguments)
                                             if f.init and f.name in values})
    except Exception as err:  # noqa: BLE001  (TrainingArguments refuses a combination: the user's options)
        problems.append(f"Trainer options: {type(err).__name__}: {' '.join(str(err).split())}")
    return opts, training_args, problems, values


# ---------------------------------------------------------------------- checking, cheaply
def _model_problem(value: str, *, option: str) -> str | None:
    """Why ``value`` cannot name a causal LM, found without loading it (None: it may)."""
    from ..integrations.models import EMBEDDED_MODELS, embedded_gguf

    kinds = ("a hub id, a folder with config.json and weights, a .gguf file, or an embedded name "
             f"({', '.join(EMBEDDED_MODELS)})")
    if not value.strip() or "\0" in value:
        return f"{option} {value!r} is no model name; pass {kinds}"
    path = Path(value).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            found = sorted(os.listdir(path))[:6]
            holds = "it holds " + ", ".join(found) if found else "it is empty"
            return (f"{option} {value!r}: the folder has no config.json ({holds}); save the model there with "
                    "model.save_pretrained(folder), or pass " + kinds)
        return None
    if path.exists():
        if path.suffix.lower() != ".gguf":
            return f"{option} {value!r} is a file but not a .gguf file; pass {kinds}"
        return None
    if value.lower() in EMBEDDED_MODELS:
        try:
            embedded_gguf(value)
        except ImportError as err:
            return f"{option} {value!r}: {err}"
        return None
    from . import _HUB_ID

    if value.startswith((".", "~", os.sep)) or value.endswith(".gguf") or ".." in value or not _HUB_ID.match(value):
        return f"{option} {value!r}: no such folder or file; pass {kinds}"
    return None  # a hub id: only loading can tell


def _is_distill_output(path: Path) -> bool:
    try:
        return json.loads((path / MARKER).read_text(encoding="utf-8")).get("format") == MARKER_FORMAT
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return False


def _output_problem(value: str, *, overwrite: bool) -> str | None:
    option = "--output-dir"
    if not value.strip() or "\0" in value:
        return f"{option} {value!r} is no folder name; pass a new or empty folder"
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        return f"{option} {value!r} is a file; pass a folder (new, empty, or an earlier `xtok-kd distill` output)"
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        return f"{option} {value!r}: {str(blocker)!r} is a file, not a folder; choose another folder"
    if path.is_dir():
        try:
            names = sorted(os.listdir(path))
        except OSError as err:
            return f"{option} {value!r} cannot be read ({err.strerror or err}); choose another folder"
        if names and not overwrite and not _is_distill_output(path):
            return (f"{option} {value!r} holds other files ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}) "
                    "and is not an earlier `xtok-kd distill` output; choose a new or empty folder, or pass "
                    "--overwrite-output-dir to write the student into it (files of the same names, e.g. config.json, "
                    "model.safetensors, tokenizer.json, are replaced)")
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        return f"{option} {value!r}: {str(existing)!r} is not writable; choose a folder you can write to"
    return None


def _cache_manifest(value: str) -> tuple[dict | None, str | None]:
    """``(manifest, problem)`` of a ``--teacher-cache`` folder, read without opening its shards."""
    path = Path(value).expanduser()
    fix = "make one with `xtok-kd cache-teacher ... -o DIR` (or write_teacher_cache)"
    if not path.is_dir():
        return None, f"--teacher-cache {value!r}: no such folder; {fix}"
    try:
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, f"--teacher-cache {value!r} is not a teacher cache (no manifest.json); {fix}"
    except (OSError, UnicodeDecodeError, ValueError) as err:
        return None, f"--teacher-cache {value!r}: its manifest.json cannot be read ({err}); rebuild it: {fix}"
    if not isinstance(manifest, dict) or manifest.get("format") != "xtok_kd.teacher_cache":
        return None, f"--teacher-cache {value!r}: manifest.json is not a teacher-cache manifest; {fix}"
    return manifest, None


def _number_problem(option: str, value: Any, *, low: float, low_open: bool = False,
                    high: float | None = None, high_open: bool = False) -> str | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low)
    ok = ok and (high is None or (value < high if high_open else value <= high))
    if ok:
        return None
    span = f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        span += f" and {'<' if high_open else '<='} {high:g}"
    return f"{option} {value!r}: must be a finite number {span}"


def check(opts: DistillArguments, *, output_dir: str | None, resume_from_checkpoint: str | None = None) -> list[str]:
    """Every problem with the options, found without loading a model, a tokenizer or the data.

    ``output_dir`` / ``resume_from_checkpoint``: the Trainer options as given (None: not given)."""
    from ..integrations.data import source_problem

    problems: list[str] = []
    add = problems.append
    cache_manifest = None
    for option, value, low, low_open in (("--temperature", opts.temperature, 0.0, True),
                                         ("--kd-weight", opts.kd_weight, 0.0, False),
                                         ("--ce-weight", opts.ce_weight, 0.0, False)):
        p = _number_problem(option, value, low=low, low_open=low_open)
        if p:
            add(p + ("" if option == "--temperature" else " (0 switches that term off)"))
    if opts.kd_weight == 0 and opts.ce_weight == 0:
        add("--kd-weight and --ce-weight are both 0: nothing to train; set at least one > 0")
    needs_teacher = not (isinstance(opts.kd_weight, (int, float)) and opts.kd_weight == 0)
    # the teacher side
    if opts.teacher_cache is not None:
        cache_manifest, p = _cache_manifest(opts.teacher_cache)
        if p:
            add(p)
        if opts.teacher is not None:
            add("--teacher and --teacher-cache: the cache replaces the teacher; pass one of them")
        if opts.data is not None:
            add("--data with --teacher-cache: the cache holds its examples; leave --data out (or build a cache of "
                "this data with `xtok-kd cache-teacher`)")
        if opts.eval_data is not None:
            add("--eval-data with --teacher-cache: held-out rows need the teacher's top-k too; use --eval-fraction "
                "(held-out rows of the cache), or cache the held-out data separately")
        if cache_manifest is not None:
            for option, given, cached in (("--max-length", opts.max_length, cache_manifest.get("max_length")),
                                          ("--loss-on", opts.loss_on, cache_manifest.get("loss_on"))):
                if given is not None and given != cached:
                    add(f"{option} {given!r} differs from the teacher cache's {cached!r} (its top-k rows follow that "
                        f"tokenization); leave {option} out, or rebuild the cache with `xtok-kd cache-teacher ... "
                        f"{option} {given}`")
            k = cache_manifest.get("k")
            if opts.teacher_top_k is not None and opts.teacher_top_k != k:
                add(f"--teacher-top-k {opts.teacher_top_k} differs from the teacher cache's top-k ({k}); leave it out")
    elif needs_teacher and opts.teacher is None:
        add("--teacher is missing: pass the teacher model (hub id, folder, .gguf file or 'smollm2'), or "
            "--teacher-cache DIR from `xtok-kd cache-teacher`, or --kd-weight 0 for plain fine-tuning")
    if opts.teacher is not None:
        p = _model_problem(opts.teacher, option="--teacher")
        if p:
            add(p)
    if opts.teacher_tokenizer is not None:
        p = tokenizer_problem(opts.teacher_tokenizer, role="--teacher-tokenizer: teacher")
        if p:
            add(p)
    if opts.teacher_dtype not in DTYPES:
        add(f"--teacher-dtype {opts.teacher_dtype!r} is not one of {', '.join(DTYPES)}")
    if opts.teacher_top_k is not None:
        p = check_int("--teacher-top-k", opts.teacher_top_k, low=1)
        if p:
            add(p)
    # the student side
    if (opts.student is None) == (opts.student_config is None):
        add("pass exactly one of --student (a model to start from) and --student-config tiny (a new small model)"
            + ("; got both" if opts.student is not None else ""))
    if opts.student is not None:
        p = _model_problem(opts.student, option="--student")
        if p:
            add(p)
        for option, value in (("--student-hidden-size", opts.student_hidden_size),
                              ("--student-layers", opts.student_layers)):
            if value is not None:
                add(f"{option} applies to --student-config tiny only; leave it out with --student")
    if opts.student_config is not None:
        if opts.student_config not in STUDENT_CONFIGS:
            add(f"--student-config {opts.student_config!r} is not one of {', '.join(STUDENT_CONFIGS)}")
        if opts.student_tokenizer is None:
            add("--student-config needs --student-tokenizer (a new model has no tokenizer of its own): a folder with "
                "tokenizer.json, a hub id, or an embedded name (qwen2.5, mistral, gpt2)")
        hidden = opts.student_hidden_size
        if hidden is not None and (check_int("--student-hidden-size", hidden, low=8, high=65536) or hidden % 8):
            add(f"--student-hidden-size {hidden!r}: must be a multiple of 8 from 8 to 65536 (4 attention heads of an "
                "even size)")
        if opts.student_layers is not None:
            p = check_int("--student-layers", opts.student_layers, low=1, high=1024)
            if p:
                add(p)
    if opts.student_tokenizer is not None:
        p = tokenizer_problem(opts.student_tokenizer, role="--student-tokenizer: student")
        if p:
            add(p)
    if opts.student_dtype not in DTYPES:
        add(f"--student-dtype {opts.student_dtype!r} is not one of {', '.join(DTYPES)}")
    # data
    if opts.teacher_cache is None:
        if opts.data is None:
            add("--data is missing: pass a .txt, .jsonl or .json file, a folder of .txt files or a `datasets` name "
                "(or --teacher-cache DIR, which holds its examples)")
        else:
            p = source_problem(opts.data, option="--data")
            if p:
                add(p)
    if opts.eval_data is not None:
        p = source_problem(opts.eval_data, option="--eval-data")
        if p:
            add(p)
    p = _number_problem("--eval-fraction", opts.eval_fraction, low=0.0, high=1.0, high_open=True)
    if p:
        add(p)
    elif opts.eval_fraction > 0 and opts.eval_data is not None:
        add("--eval-data and --eval-fraction: pass one of them (held-out data, or a fraction of the training data)")
    for option, value in (("--text-field", opts.text_field), ("--messages-field", opts.messages_field)):
        if not value:
            add(f"{option} is empty; pass the name of a row field")
    p = check_int("--chars-per-example", opts.chars_per_example, low=1)
    if p:
        add(p)
    # the loss and the collator
    if opts.mapping not in _mappings():
        add(f"--mapping {opts.mapping!r} is not one of {', '.join(_mappings())}")
    if opts.divergence not in _divergences():
        add(f"--divergence {opts.divergence!r} is not one of {', '.join(_divergences())}")
    top_k_source = ("--teacher-cache" if opts.teacher_cache is not None else
                    f"--teacher-top-k {opts.teacher_top_k}" if opts.teacher_top_k is not None else None)
    if needs_teacher and top_k_source is not None:  # the teacher comes as its temperature-1 top-k only
        if opts.mapping == "hybrid":
            add(f"--mapping hybrid needs the teacher's full logits, but {top_k_source} gives its top-k only; use "
                "--mapping projection or uld, or a live --teacher without --teacher-top-k")
        if isinstance(opts.temperature, (int, float)) and opts.temperature != 1:
            add(f"--temperature {opts.temperature:g}: {top_k_source} gives temperature-1 log-probabilities; use "
                "--temperature 1, or a live --teacher without --teacher-top-k")
    if opts.max_length is not None:
        p = check_int("--max-length", opts.max_length, low=2)
        if p:
            add(p)
    if opts.loss_on is not None and opts.loss_on not in LOSS_ON:
        add(f"--loss-on {opts.loss_on!r} is not one of {', '.join(LOSS_ON)}")
    # the output folder and resuming
    if output_dir is None:
        add("--output-dir is missing: pass the folder that gets the student (new, empty, or an earlier distill output)")
    else:
        p = _output_problem(output_dir, overwrite=opts.overwrite_output_dir)
        if p:
            add(p)
    if resume_from_checkpoint:
        p = _resume_problem(resume_from_checkpoint, output_dir)
        if p:
            add(p)
    return problems


def _resume_problem(value: str, output_dir: str | None) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    option = "--resume-from-checkpoint"
    if value.strip().lower() in _RESUME_LAST:
        if output_dir is None:
            return None  # reported as a missing --output-dir
        folder = Path(output_dir).expanduser()
        if not folder.is_dir() or get_last_checkpoint(str(folder)) is None:
            return (f"{option} {value}: {output_dir!r} holds no checkpoint-N folder to resume from; pass the "
                    "--output-dir of the interrupted run, a checkpoint folder, or leave the option out")
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        return (f"{option} {value!r}: no such checkpoint folder; pass a checkpoint-N folder, or 'last' for the newest "
                "one")
    if not (path / "trainer_state.json").is_file():
        return (f"{option} {value!r} is not a Trainer checkpoint (no trainer_state.json); pass a checkpoint-N folder "
                "of an earlier run, or 'last'")
    return None


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
    return student_view, student_view  # --kd-weight 0 and no teacher: the KD term is off


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
    teacher = None
    if kd and cache is None:
        teacher = _load_model(opts.teacher, role="teacher", dtype=opts.teacher_dtype)
        p = _width_problem(teacher, teacher_view, role="teacher")
        if p:
            raise CliError(p)
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
                         if teacher is not None else "the cache's top-k" if cache is not None and kd else "none"))

    # the trainer ----------------------------------------------------------------------------------
    class _LogLastStep(TrainerCallback):
        """Log at the last step too, so the final ce/kd are in the history whatever --logging-steps is."""

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if state.max_steps and state.global_step >= state.max_steps:
                control.should_log = True
            return control

    loss_options = {"mapping": opts.mapping if kd else "uld", "divergence": opts.divergence,
                    "temperature": opts.temperature}
    with _memory_guard("building the trainer"):
        trainer = CrossTokenizerKDTrainer(
            model=student, args=training_args, teacher_model=teacher, teacher_tokenizer=teacher_view,
            student_tokenizer=student_view, loss_options=loss_options, kd_weight=opts.kd_weight,
            ce_weight=opts.ce_weight, teacher_top_k=opts.teacher_top_k if cache is None else None,
            max_length=None if cache is not None else max_length, loss_on=None if cache is not None else loss_on,
            train_dataset=data.train, eval_dataset=data.eval, callbacks=[_LogLastStep()])
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
            "skipped_by_collator": int(getattr(collator, "skipped", 0)),
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
