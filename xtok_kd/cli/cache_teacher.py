"""``xtok-kd cache-teacher --teacher T --student S --data FILE -o DIR``: run the teacher once, save its top-k.

Every option is checked before anything is loaded and all problems are reported together; nothing is written
until they are fixed. Rerunning the same command on an interrupted cache keeps its verified shards and continues.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from . import CliError, check_int, fail_if_any, open_tokenizer, tokenizer_problem

DTYPES = ("auto", "float32", "bfloat16", "float16")
LOSS_ON = ("all", "assistant")
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
                   help="a .jsonl/.json with a 'text' or 'messages' per row, a .txt (or folder of them) cut into "
                        "passages at paragraphs, a .parquet/.csv file or a `datasets` name")
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


def _memory_error(args: argparse.Namespace, err: BaseException) -> BaseException:
    """A CliError naming the flags that lower memory when ``err`` is out-of-memory, else ``err`` itself."""
    import torch

    text = str(err)
    if not (isinstance(err, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in text
            or "can't allocate memory" in text):
        return err
    first = text.splitlines()[0][:200] if text else type(err).__name__
    return CliError(f"the teacher {args.teacher!r} ran out of memory ({first}); finished shards are kept. Fix: "
                    f"{_MEMORY_FLAGS} (now --batch-size {args.batch_size}, --dtype {args.dtype}, --max-length "
                    f"{args.max_length})")


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
        diff = manifest and tc.settings_mismatch(manifest, settings)
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
    try:
        tc.write_teacher_cache(model, teacher, student, examples, out, top_k=args.top_k, max_length=args.max_length,
                            loss_on=args.loss_on, batch_size=args.batch_size, shard_size=args.shard_size,
                            teacher_name=args.teacher, progress=not args.no_progress, overwrite=args.overwrite)
    except (MemoryError, RuntimeError) as err:
        raise _memory_error(args, err) from None
    done = time.perf_counter()
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    shards = sum(s["bytes"] for s in manifest["shards"])
    print(f"cache: {out} ({len(manifest['shards'])} shards of {shards / 1e6:.1f} MB; {size / 1e6:.1f} MB on disk with "
          "the teacher tokenizer)")
    print(f"examples: {manifest['num_examples']:,}" + (f" (skipped: {why})" if why else ""))
    print(f"tokens: {manifest['tokens']:,} teacher tokens, top-{manifest['k']} log-probabilities each (and the "
          "next token's)")
    print(f"teacher: {args.teacher} [{teacher.fingerprint}] {teacher.vocab_size:,} ids on {device}, dtype "
          f"{next(iter(model.parameters())).dtype}; student tokenizer: {student.name} [{student.fingerprint}]")
    print(f"time: load {loaded - start:.1f} s, teacher {done - loaded:.1f} s")
    return 0
