"""``xtok-kd distill``'s options: :class:`DistillArguments`, the parser (with every ``TrainingArguments`` flag) and
the cheap checks run before anything is loaded."""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from . import CliError, check_int, tokenizer_problem
from .cache_teacher import teacher_text_problems

MARKER = "xtok_kd_distill.json"
MARKER_FORMAT = "xtok_kd.distill"
DTYPES = ("auto", "float32", "bfloat16", "float16")
STUDENT_CONFIGS = ("tiny",)
LOSS_ON = ("all", "assistant")
BALANCES = ("fixed", "dynamic")
DEFAULT_MAX_LENGTH = 512
DEFAULT_HIDDEN_SIZE, DEFAULT_LAYERS = 64, 2
_RESUME_LAST = ("true", "last", "latest")
_MEMORY_FIX = ("--teacher-cache DIR (run `xtok-kd cache-teacher` first: no teacher in memory while training), "
               "--teacher-dtype bfloat16, a smaller --per-device-train-batch-size (raise "
               "--gradient-accumulation-steps to keep the batch), a smaller --max-length, --gradient-checkpointing, "
               "a smaller --loss-block-rows (the KD loss's rows per block)")


def _mappings() -> tuple[str, ...]:
    from ..losses.mappings import MAPPINGS

    return tuple(MAPPINGS)


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
        "Not needed with --teacher-cache (unless --lmbda > 0: it grades the on-policy batches) or --kd-weight 0")})
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
        "training data: a .txt file (cut into passages at blank lines), a .jsonl/.json file with 'text', "
        "'messages' or 'prompt' + 'completion' rows, a folder of .txt files, a .parquet/.csv file, or a `datasets` "
        "name. Not needed with --teacher-cache")})
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
        "how the two vocabularies are compared: projection, uld, hybrid, sinkhorn, cdm or alm (see the README's "
        "mapping table)")})
    divergence: str = field(default="fkl", metadata={"help": (
        "divergence: fkl, rkl, jsd, tvd, skl, srkl, akl, symmetric_kl")})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature of both models in the KD loss"})
    loss_block_rows: int = field(default=32, metadata={"help": (
        "aligned rows the KD loss processes at once (CrossTokenizerKDLoss block_rows): its memory is about rows x "
        "(teacher + student vocabulary) x 4 bytes x ~10 live buffers; lower it if the loss runs out of memory, raise "
        "it (256-1024) on a GPU for speed")})
    kd_weight: float = field(default=1.0, metadata={"help": "weight of the distillation loss (0: plain fine-tuning)"})
    ce_weight: float = field(default=1.0, metadata={"help": "weight of the student's own next-token cross-entropy"})
    teacher_tail: bool = field(default=True, metadata={"help": (
        "projection with a top-k teacher (a cache, --teacher-top-k): compare the top-k as it is plus a tail atom "
        "(default); --no-teacher-tail renormalises the top-k instead")})
    kd_balance: str = field(default="fixed", metadata={"help": (
        "fixed: --kd-weight as given; dynamic: each batch's KD term rescaled to its CE term's size (kd_weight * "
        "sg(CE / KD) * KD); needs --ce-weight > 0")})
    lmbda: float = field(default=0.0, metadata={"help": (
        "on-policy distillation (GKD): the probability, in [0, 1], that a training micro-batch is replaced by text "
        "the student writes itself (it continues each row's prompt by sampling), graded by the live teacher: KD on "
        "the completion only, no cross-entropy on the student's own samples. Needs --teacher (with --teacher-cache "
        "too: the cache serves the other batches) and text or prompt/completion rows; costs one generation per "
        "on-policy batch. 0: off")})
    max_new_tokens: int | None = field(default=None, metadata={"help": (
        "--lmbda > 0: tokens the student writes per row (default: as many as the row's own completion had)")})
    on_policy_temperature: float = field(default=1.0, metadata={"help": (
        "--lmbda > 0: the student's sampling temperature, > 0 (no top-k/top-p filtering)")})
    prompt_share: float = field(default=0.5, metadata={"help": (
        "--lmbda > 0: share of a text row's student tokens kept as the prompt, in (0, 1)")})
    add_teacher_text: bool = field(default=False, metadata={"help": (
        "sequence-level KD: before training, the live --teacher continues the opening of every training example "
        "(sampled, as long as the example, within --max-length; batches of --per-device-train-batch-size) and its "
        "texts are added to the training rows. With --kd-weight 0: CE on the corpus and the teacher's text (SeqKD). "
        "Needs --teacher and --data (for a cache: `xtok-kd cache-teacher --add-teacher-text`)")})
    teacher_text_prompt_share: float | None = field(default=None, metadata={"help": (
        "--add-teacher-text: share of each example's teacher tokens kept as the prompt, in (0, 1) (0.25)")})
    teacher_text_temperature: float | None = field(default=None, metadata={"help": (
        "--add-teacher-text: the teacher's sampling temperature, > 0, no top-k/top-p filtering (1.0)")})
    teacher_text_seed: int | None = field(default=None, metadata={"help": (
        "--add-teacher-text: sampling seed, >= 0 (0)")})
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

    def add(problem: str | None) -> None:
        if problem:
            problems.append(problem)

    cache_manifest = None
    for option, value, low, low_open in (("--temperature", opts.temperature, 0.0, True),
                                         ("--kd-weight", opts.kd_weight, 0.0, False),
                                         ("--ce-weight", opts.ce_weight, 0.0, False)):
        p = _number_problem(option, value, low=low, low_open=low_open)
        if p:
            add(p + ("" if option == "--temperature" else " (0 switches that term off)"))
    on_policy = _number_problem("--lmbda", opts.lmbda, low=0.0, high=1.0) is None and opts.lmbda > 0
    add(_number_problem("--lmbda", opts.lmbda, low=0.0, high=1.0))
    add(_number_problem("--on-policy-temperature", opts.on_policy_temperature, low=0.0, low_open=True))
    add(_number_problem("--prompt-share", opts.prompt_share, low=0.0, low_open=True, high=1.0, high_open=True))
    if opts.max_new_tokens is not None:
        add(check_int("--max-new-tokens", opts.max_new_tokens, low=1))
    if on_policy and opts.teacher_cache is not None and opts.teacher is None:
        add(f"--lmbda {opts.lmbda:g} with --teacher-cache needs --teacher too: on-policy batches are the student's "
            "own text, which the cache holds no teacher predictions for; pass --teacher MODEL (the cache still "
            "serves the other batches), or --lmbda 0")
    if on_policy and isinstance(opts.kd_weight, (int, float)) and opts.kd_weight == 0:
        add(f"--lmbda {opts.lmbda:g} with --kd-weight 0: on-policy batches are trained by the KD term only (no "
            "cross-entropy on the student's own samples); set --kd-weight > 0, or --lmbda 0")
    add(check_int("--loss-block-rows", opts.loss_block_rows, low=1, high=1 << 20))
    problems += teacher_text_problems(opts)
    if opts.add_teacher_text and opts.teacher_cache is not None:
        add("--add-teacher-text with --teacher-cache: the cache holds its examples and the teacher's top-k for them "
            "only; build a cache that holds the teacher's text too with `xtok-kd cache-teacher ... "
            "--add-teacher-text -o DIR` and distill from it, or pass --teacher and --data instead of --teacher-cache")
    elif opts.add_teacher_text and opts.teacher is None:
        add("--add-teacher-text needs --teacher: the model that writes the text (with --kd-weight 0 it only writes)")
    if opts.kd_balance not in BALANCES:
        add(f"--kd-balance {opts.kd_balance!r} is not one of {', '.join(BALANCES)}")
    elif opts.kd_balance == "dynamic" and opts.ce_weight == 0:
        add("--kd-balance dynamic sizes the KD term like the CE term, but --ce-weight is 0; use --kd-balance "
            "fixed or set --ce-weight > 0")
    if opts.kd_weight == 0 and opts.ce_weight == 0:
        add("--kd-weight and --ce-weight are both 0: nothing to train; set at least one > 0")
    needs_teacher = not (isinstance(opts.kd_weight, (int, float)) and opts.kd_weight == 0)
    # the teacher side
    if opts.teacher_cache is not None:
        cache_manifest, p = _cache_manifest(opts.teacher_cache)
        if p:
            add(p)
        if opts.teacher is not None and not on_policy:
            add("--teacher and --teacher-cache: the cache replaces the teacher; pass one of them (both only with "
                "--lmbda > 0: the teacher grades the on-policy batches)")
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
        add(_model_problem(opts.teacher, option="--teacher"))
    if opts.teacher_tokenizer is not None:
        add(tokenizer_problem(opts.teacher_tokenizer, role="--teacher-tokenizer: teacher"))
    if opts.teacher_dtype not in DTYPES:
        add(f"--teacher-dtype {opts.teacher_dtype!r} is not one of {', '.join(DTYPES)}")
    if opts.teacher_top_k is not None:
        add(check_int("--teacher-top-k", opts.teacher_top_k, low=1))
    # the student side
    if (opts.student is None) == (opts.student_config is None):
        add("pass exactly one of --student (a model to start from) and --student-config tiny (a new small model)"
            + ("; got both" if opts.student is not None else ""))
    if opts.student is not None:
        add(_model_problem(opts.student, option="--student"))
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
            add(check_int("--student-layers", opts.student_layers, low=1, high=1024))
    if opts.student_tokenizer is not None:
        add(tokenizer_problem(opts.student_tokenizer, role="--student-tokenizer: student"))
    if opts.student_dtype not in DTYPES:
        add(f"--student-dtype {opts.student_dtype!r} is not one of {', '.join(DTYPES)}")
    # data
    if opts.teacher_cache is None:
        if opts.data is None:
            add("--data is missing: pass a .txt, .jsonl or .json file, a folder of .txt files or a `datasets` name "
                "(or --teacher-cache DIR, which holds its examples)")
        else:
            add(source_problem(opts.data, option="--data"))
    if opts.eval_data is not None:
        add(source_problem(opts.eval_data, option="--eval-data"))
    p = _number_problem("--eval-fraction", opts.eval_fraction, low=0.0, high=1.0, high_open=True)
    if p:
        add(p)
    elif opts.eval_fraction > 0 and opts.eval_data is not None:
        add("--eval-data and --eval-fraction: pass one of them (held-out data, or a fraction of the training data)")
    for option, value in (("--text-field", opts.text_field), ("--messages-field", opts.messages_field)):
        if not value:
            add(f"{option} is empty; pass the name of a row field")
    add(check_int("--chars-per-example", opts.chars_per_example, low=1))
    # the loss and the collator
    if opts.mapping not in _mappings():
        add(f"--mapping {opts.mapping!r} is not one of {', '.join(_mappings())}")
    if opts.divergence not in _divergences():
        add(f"--divergence {opts.divergence!r} is not one of {', '.join(_divergences())}")
    top_k_source = ("--teacher-cache" if opts.teacher_cache is not None else
                    f"--teacher-top-k {opts.teacher_top_k}" if opts.teacher_top_k is not None else None)
    if needs_teacher and top_k_source is not None:  # the teacher comes as its temperature-1 top-k only
        if opts.mapping == "hybrid":  # the one mapping that needs full logits (MappingMethod.accepts_topk)
            add(f"--mapping hybrid needs the teacher's full logits, but {top_k_source} gives its top-k only; use "
                "--mapping projection or uld, or a live --teacher without --teacher-top-k")
        if isinstance(opts.temperature, (int, float)) and opts.temperature != 1:
            add(f"--temperature {opts.temperature:g}: {top_k_source} gives temperature-1 log-probabilities; use "
                "--temperature 1, or a live --teacher without --teacher-top-k")
    if opts.max_length is not None:
        add(check_int("--max-length", opts.max_length, low=2))
    if opts.loss_on is not None and opts.loss_on not in LOSS_ON:
        add(f"--loss-on {opts.loss_on!r} is not one of {', '.join(LOSS_ON)}")
    # the output folder and resuming
    if output_dir is None:
        add("--output-dir is missing: pass the folder that gets the student (new, empty, or an earlier distill output)")
    else:
        add(_output_problem(output_dir, overwrite=opts.overwrite_output_dir))
    if resume_from_checkpoint:
        add(_resume_problem(resume_from_checkpoint, output_dir))
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
