"""``xtok-kd cache-teacher --teacher T --student S --data FILE -o DIR``: run the teacher once, save its top-k.

Every option is checked before anything is loaded and all problems are reported together; nothing is written
until they are fixed. Rerunning the same command on an interrupted cache keeps its verified shards and continues.

``--add-teacher-text`` (sequence-level KD): before caching, the teacher continues the opening of every example
(:func:`xtok_kd.integrations.teacher_text.generate_teacher_texts`, with the cache's ``--max-length`` and
``--batch-size``) and its texts are appended, so the cache holds the corpus and then one teacher-written row per
example, each with the teacher's top-k. The manifest records them under ``teacher_text``; a rerun must give the same
settings (the texts are regenerated, seeded, and must match the cache's examples digest to resume).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from . import CliError, check_int, fail_if_any, open_tokenizer, tokenizer_problem

DTYPES = ("auto", "float32", "bfloat16", "float16")
LOSS_ON = ("all", "assistant")
#: --teacher-text-* defaults (None on the command line: the option was not given)
TEXT_DEFAULTS = {"prompt_share": 0.25, "temperature": 1.0, "seed": 0}
_MEMORY_FLAGS = ("lower --batch-size (a rerun with another batch size resumes the finished shards), or use "
                 "--dtype bfloat16 or a smaller --max-length (these change the cache: add --overwrite or choose "
                 "another -o)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache-teacher", help="run a teacher once over a data file and save its top-k for distillation",
                       description="Run the teacher model over the examples of --data and save, per token, its top-k "
                                   "next-token log-probabilities and the log-probability of the actual next token in "
                                   "a resumable, self-contained cache folder.")
    p.add_argument("--teacher", required=True,
                   help="teacher model: hub id, folder saved with save_pretrained, .gguf file, or 'smollm2'")
    p.add_argument("--teacher-tokenizer", default=None,
                   help="teacher tokenizer (folder, hub id, embedded name); default: the model's own")
    p.add_argument("--student", required=True,
                   help="student TOKENIZER: folder with tokenizer.json (a model folder works), hub id, or an "
                        "embedded name (qwen2.5, mistral, gpt2)")
    p.add_argument("--data", required=True,
                   help="a .jsonl/.json with a 'text', 'messages' or 'prompt' + 'completion' per row, a .txt (or "
                        "folder of them) cut into passages at paragraphs, a .parquet/.csv file or a `datasets` name")
    p.add_argument("-o", "--output", required=True, help="the cache folder (new, empty, or a cache to resume)")
    p.add_argument("--top-k", type=int, default=64, help="teacher tokens kept per position, 1 to 65536 (64)")
    p.add_argument("--max-length", type=int, default=None, help="truncate each example to this many tokens")
    p.add_argument("--batch-size", type=int, default=8, help="examples per teacher forward (8)")
    p.add_argument("--shard-size", type=int, default=1024, help="examples per shard file (1024)")
    p.add_argument("--chars-per-example", type=int, default=2000,
                   help=".txt data: passages of about this many characters, cut at blank lines (2000)")
    p.add_argument("--loss-on", default="all", help="all | assistant: which content counts (as the collator's)")
    p.add_argument("--dtype", default="auto", help="teacher dtype: auto (the checkpoint's) | float32 | bfloat16 | "
                                                   "float16")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a cache made with other settings or an older format version (a folder that is "
                        "not a cache is never replaced)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("teacher-written text (sequence-level KD)")
    g.add_argument("--add-teacher-text", action="store_true",
                   help="before caching, append one row per example: the example's opening continued by the teacher "
                        "(sampled, as long as the example, within --max-length); the cache holds both, with top-k")
    g.add_argument("--teacher-text-prompt-share", type=float, default=None,
                   help="--add-teacher-text: share of each example's teacher tokens kept as the prompt, in (0, 1) "
                        f"({TEXT_DEFAULTS['prompt_share']})")
    g.add_argument("--teacher-text-temperature", type=float, default=None,
                   help="--add-teacher-text: the teacher's sampling temperature, > 0, no top-k/top-p filtering "
                        f"({TEXT_DEFAULTS['temperature']})")
    g.add_argument("--teacher-text-seed", type=int, default=None,
                   help=f"--add-teacher-text: sampling seed, >= 0 ({TEXT_DEFAULTS['seed']}); the text also depends on "
                        "--batch-size (one seed per batch)")


def _teacher_problem(value: str, has_tokenizer: bool) -> str | None:
    from ..integrations.models import EMBEDDED_MODELS, embedded_gguf

    if not value or "\0" in value:
        return f"--teacher {value!r}: pass a hub id, a model folder, a .gguf file or 'smollm2'"
    if value.lower() in EMBEDDED_MODELS:
        try:
            embedded_gguf(value)
        except ImportError as err:
            return f"--teacher {value!r}: {err}"
        return None
    if os.path.isfile(value):
        return None if value.endswith(".gguf") else (
            f"--teacher {value!r} is a file but not a .gguf; pass a model folder, a .gguf file or a hub id")
    if os.path.isdir(value):
        if not os.path.isfile(os.path.join(value, "config.json")):
            return (f"--teacher {value!r}: the folder has no config.json; save the model there with "
                    "model.save_pretrained(folder)")
        if not has_tokenizer and not os.path.isfile(os.path.join(value, "tokenizer.json")):
            return (f"--teacher {value!r}: the folder has no tokenizer.json; save the model's tokenizer there "
                    "(tokenizer.save_pretrained(folder)) or pass --teacher-tokenizer")
        return None
    if value.endswith(".gguf") or value.startswith((".", "~", os.sep)) or value.count("/") > 1:
        return f"--teacher {value!r}: no such file or folder"
    return None  # a hub id: only loading can tell


def check(args: argparse.Namespace) -> list[str]:
    """Every problem with the options, found without loading a model or tokenizer or writing anything."""
    from ..integrations.data import source_problem
    from ..teacher_cache import cache_dir_problem

    problems = [p for p in (_teacher_problem(args.teacher, args.teacher_tokenizer is not None),
                            args.teacher_tokenizer is not None and tokenizer_problem(args.teacher_tokenizer,
                                                                                    role="teacher"),
                            tokenizer_problem(args.student, role="student")) if p]
    problem = source_problem(args.data, option="--data")
    if problem is not None:
        problems.append(problem)
    if not args.output or "\0" in args.output:
        problems.append(f"-o {args.output!r}: pass a folder for the cache")
    else:
        problem = cache_dir_problem(args.output)
        if problem is not None:
            problems.append(f"-o {problem}")
    problems += [p for p in (check_int("--top-k", args.top_k, low=1, high=65536),
                             args.max_length is not None and check_int("--max-length", args.max_length, low=1),
                             check_int("--batch-size", args.batch_size, low=1, high=1 << 20),
                             check_int("--shard-size", args.shard_size, low=1, high=1 << 24),
                             check_int("--chars-per-example", args.chars_per_example, low=1)) if p]
    if args.loss_on not in LOSS_ON:
        problems.append(f"--loss-on {args.loss_on!r}: must be one of {', '.join(LOSS_ON)}")
    problems += teacher_text_problems(args)
    if args.add_teacher_text and args.max_length == 1:
        problems.append("--max-length 1 with --add-teacher-text: leaves the teacher no room to write after the "
                        "prompt; pass --max-length 2 or more")
    if args.dtype not in DTYPES:
        problems.append(f"--dtype {args.dtype!r}: must be one of {', '.join(DTYPES)}")
    if args.device is not None:
        import torch

        try:
            device = torch.device(args.device)
        except (RuntimeError, ValueError):
            problems.append(f"--device {args.device!r}: not a device; pass cpu, cuda, cuda:1, mps, ...")
        else:
            if device.type == "cuda" and not torch.cuda.is_available():
                problems.append(f"--device {args.device!r}: no CUDA device is visible here; pass --device cpu")
    return problems


def teacher_text_problems(args: Any) -> list[str]:
    """The problems with ``--add-teacher-text`` and its ``--teacher-text-*`` settings (shared by ``distill``)."""
    import math

    given = {name: getattr(args, f"teacher_text_{name}") for name in TEXT_DEFAULTS}
    if not args.add_teacher_text:
        return [f"--teacher-text-{name.replace('_', '-')} applies with --add-teacher-text only; add that flag or "
                "leave it out" for name, value in given.items() if value is not None]
    problems = []
    share, temperature, seed = given["prompt_share"], given["temperature"], given["seed"]
    if share is not None and not (math.isfinite(share) and 0 < share < 1):
        problems.append(f"--teacher-text-prompt-share {share!r}: must be a number strictly between 0 and 1 (the "
                        "share of each example kept as the teacher's prompt)")
    if temperature is not None and not (math.isfinite(temperature) and temperature > 0):
        problems.append(f"--teacher-text-temperature {temperature!r}: must be a finite number > 0")
    if seed is not None:
        problems += [p for p in (check_int("--teacher-text-seed", seed, low=0, high=(1 << 32) - 1),) if p]
    return problems


def teacher_text_settings(args: Any) -> dict[str, Any]:
    """``{"prompt_share", "temperature", "seed"}`` of ``--teacher-text-*``, defaults filled in."""
    return {name: default if getattr(args, f"teacher_text_{name}") is None else getattr(args, f"teacher_text_{name}")
            for name, default in TEXT_DEFAULTS.items()}


def _teacher_text_mismatch(manifest: dict[str, Any], settings: dict[str, Any], record: dict[str, Any] | None
                           ) -> list[str]:
    """What differs between an existing cache and this run, teacher-written rows included (``record``: None when
    this run adds none). The examples' count and digest are compared on the corpus only when rows are added: the
    teacher's texts exist once the model is loaded, and the writer compares the whole."""
    from .. import teacher_cache as tc

    old = manifest.get("teacher_text")
    if record is None:
        diff = tc.settings_mismatch(manifest, settings)
        if old is not None and diff:
            diff.append(f"the cache holds {old.get('rows')} teacher-written rows (made with --add-teacher-text "
                        f"{_words(old)})")
        return diff
    corpus_only = {k: v for k, v in settings.items() if k not in ("num_examples", "examples_sha256")}
    diff = tc.settings_mismatch(manifest, corpus_only)
    if old is None:
        return [*diff, "the cache has no teacher-written rows (it was made without --add-teacher-text)"]
    for key, value in record.items():
        if old.get(key) != value:
            diff.append(f"teacher text {key}: cache {old.get(key)!r}, now {value!r}")
    return diff


def _words(record: dict[str, Any]) -> str:
    return (f"--teacher-text-prompt-share {record.get('prompt_share')} --teacher-text-temperature "
            f"{record.get('temperature')} --teacher-text-seed {record.get('seed')}, --batch-size "
            f"{record.get('batch_size')}")


def _text_record(args: argparse.Namespace, examples: list[dict[str, Any]]) -> dict[str, Any] | None:
    """What the manifest records of ``--add-teacher-text`` (None without it): the rows it adds, the corpus they
    continue (count and digest) and every setting the texts depend on besides the teacher, its tokenizer and
    ``--max-length`` (compared as cache settings)."""
    if not args.add_teacher_text:
        return None
    from ..teacher_cache.format import examples_sha256

    return {"rows": len(examples), "corpus_sha256": examples_sha256(examples), **teacher_text_settings(args),
            "batch_size": args.batch_size}


def _teacher_texts(args: argparse.Namespace, model: Any, teacher: Any, examples: list[dict[str, Any]]
                   ) -> list[dict[str, str]]:
    """One teacher-written row per example (``--add-teacher-text``); CliError for chat rows or out of memory."""
    from ..integrations.teacher_text import generate_teacher_texts

    settings = teacher_text_settings(args)
    try:
        return generate_teacher_texts(model, teacher, examples, max_length=args.max_length,
                                      batch_size=args.batch_size, progress=not args.no_progress, **settings)
    except ValueError as err:
        raise CliError(f"--add-teacher-text: {err}") from None
    except (MemoryError, RuntimeError) as err:
        raise _memory_error(args, err) from None


def _memory_error(args: argparse.Namespace, err: BaseException) -> BaseException:
    """A CliError naming the flags that lower memory when ``err`` is out-of-memory, else ``err`` itself."""
    import torch

    text = str(err)
    if not (isinstance(err, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in text
            or "can't allocate memory" in text):
        return err
    first = text.splitlines()[0][:200] if text else type(err).__name__
    text_note = ("; with --add-teacher-text the teacher's text depends on --batch-size too: another batch size "
                 "writes other text, so a cache of it is rebuilt (--overwrite) rather than resumed"
                 if getattr(args, "add_teacher_text", False) else "")
    return CliError(f"the teacher {args.teacher!r} ran out of memory ({first}); finished shards are kept. Fix: "
                    f"{_MEMORY_FLAGS} (now --batch-size {args.batch_size}, --dtype {args.dtype}, --max-length "
                    f"{args.max_length}){text_note}")


def run(args: argparse.Namespace) -> int:
    import torch

    from .. import teacher_cache as tc
    from ..integrations.data import load_examples
    from ..integrations.models import load_causal_lm, load_model_tokenizer
    from ..tokenizer import load_tokenizer

    fail_if_any(check(args))
    start = time.perf_counter()
    try:
        examples, skipped = load_examples(args.data, loss_on=args.loss_on, chars_per_example=args.chars_per_example)
    except ValueError as err:  # unreadable, or every row bad: the message names the counts and the format
        raise CliError(f"--data: {err}") from None
    why = ", ".join(f"{n} {reason}" for reason, n in skipped.items())
    student = open_tokenizer(args.student, role="student")
    if args.teacher_tokenizer is not None:
        teacher = open_tokenizer(args.teacher_tokenizer, role="teacher")
    else:
        try:
            teacher = load_tokenizer(load_model_tokenizer(args.teacher))
        except (OSError, ValueError, ImportError) as err:
            raise CliError(f"--teacher {args.teacher!r}: its tokenizer could not be loaded ({err}); pass "
                           "--teacher-tokenizer") from None
    out = Path(args.output)
    if (out / "manifest.json").is_file() and not args.overwrite:  # refuse other settings before loading the model
        from ..teacher_cache.format import stored_version, version_message

        found = stored_version(out)
        if found is not None:
            raise CliError(version_message(out, found))
        try:
            manifest = tc.read_manifest(out)
        except ValueError:
            manifest = None  # a corrupt manifest among our own files: the cache is rebuilt
        settings = tc.cache_settings(teacher, student, examples, top_k=args.top_k, max_length=args.max_length,
                                  loss_on=args.loss_on, shard_size=args.shard_size)
        diff = manifest and _teacher_text_mismatch(manifest, settings, _text_record(args, examples))
        if diff:
            raise CliError(f"-o {str(out)!r} holds a teacher cache made with other settings: {'; '.join(diff)}. "
                           "Fix: choose another -o, or pass --overwrite to replace it")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    loaded = time.perf_counter()
    try:
        model = load_causal_lm(args.teacher, dtype=dtype, device=device)
    except OSError as err:
        raise CliError(f"--teacher {args.teacher!r} could not be loaded ({err}); pass a model folder saved with "
                       "save_pretrained, a .gguf file, 'smollm2', or a reachable hub id") from None
    except (MemoryError, RuntimeError) as err:
        raise _memory_error(args, err) from None
    loaded = time.perf_counter()
    notes, corpus_rows = {}, len(examples)
    if args.add_teacher_text:
        record = _text_record(args, examples)
        examples = examples + _teacher_texts(args, model, teacher, examples)
        notes["teacher_text"] = record
        print(f"teacher text: {record['rows']:,} rows written by the teacher in {time.perf_counter() - loaded:.1f} s "
              f"({_words(record)})")
    written = time.perf_counter()
    try:
        tc.write_teacher_cache(model, teacher, student, examples, out, top_k=args.top_k, max_length=args.max_length,
                            loss_on=args.loss_on, batch_size=args.batch_size, shard_size=args.shard_size,
                            teacher_name=args.teacher, progress=not args.no_progress, overwrite=args.overwrite,
                            notes=notes)
    except (MemoryError, RuntimeError) as err:
        raise _memory_error(args, err) from None
    except ValueError as err:
        if args.add_teacher_text and "examples (their digest)" in str(err):
            raise CliError(f"{err}. The teacher wrote other text than the cache holds with the same "
                           "--teacher-text-* settings (another device, dtype or library version samples "
                           "differently)") from None
        raise
    done = time.perf_counter()
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    shards = sum(s["bytes"] for s in manifest["shards"])
    print(f"cache: {out} ({len(manifest['shards'])} shards of {shards / 1e6:.1f} MB; {size / 1e6:.1f} MB on disk with "
          "the teacher tokenizer)")
    print(f"examples: {manifest['num_examples']:,}" + (f" (skipped: {why})" if why else "")
          + (f"; {corpus_rows:,} from --data and {manifest['num_examples'] - corpus_rows:,} written by the teacher"
             if args.add_teacher_text else ""))
    print(f"tokens: {manifest['tokens']:,} teacher tokens, top-{manifest['k']} log-probabilities each (and the "
          "next token's)")
    print(f"teacher: {args.teacher} [{teacher.fingerprint}] {teacher.vocab_size:,} ids on {device}, dtype "
          f"{next(iter(model.parameters())).dtype}; student tokenizer: {student.name} [{student.fingerprint}]")
    print(f"time: load {loaded - start:.1f} s, " + (f"teacher text {written - loaded:.1f} s, "
                                                      if args.add_teacher_text else "")
          + f"teacher {done - written:.1f} s")
    return 0
