"""``xtok-kd inspect TEACHER STUDENT``: what the two vocabularies share, as text, JSON and a PNG."""

from __future__ import annotations

import argparse
import json
import os

from . import CliError, open_tokenizer


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="report what two vocabularies share",
                       description="Vocabulary sizes, exact overlap, projection coverage, coverage by category, "
                                   "and (with --text) fertility and chunk statistics on a text.")
    p.add_argument("teacher", help="teacher tokenizer: folder with tokenizer.json, hub id, or an embedded name "
                                   "(qwen2.5, mistral, gpt2)")
    p.add_argument("student", help="student tokenizer: folder with tokenizer.json, hub id, or an embedded name")
    p.add_argument("--table", help="a saved table (default: build it, or reuse the cached one)")
    p.add_argument("--text", help="a UTF-8 text file for fertility and chunk statistics (default: the embedded "
                                  "sample, xtok_kd/assets/sample.txt; pass --text '' to skip)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--plot", help="write a PNG of the report here")
    p.add_argument("--samples", type=int, default=8, help="unmatched tokens shown per side (8)")


def run(args: argparse.Namespace) -> int:
    from ..vocab import VocabAlignment, get_or_build
    from ..vocab.report import format_report, plot_report, vocabulary_report

    from ..assets import SAMPLE_TEXT

    text = None
    if args.text is None:
        args.text = str(SAMPLE_TEXT)
    if args.text:
        if not os.path.isfile(args.text):
            raise CliError(f"--text {args.text!r}: no such file; pass a UTF-8 text file")
        try:
            with open(args.text, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as err:
            raise CliError(f"--text {args.text!r} is not UTF-8 ({err})") from None
        if not text:
            raise CliError(f"--text {args.text!r} is empty")
    if args.plot is not None and not args.plot.endswith(".png"):
        raise CliError(f"--plot {args.plot!r} should end in .png")
    if args.samples < 0:
        raise CliError(f"--samples must be >= 0, got {args.samples}")
    teacher = open_tokenizer(args.teacher, role="teacher")
    student = open_tokenizer(args.student, role="student")
    if args.table is not None:
        table = VocabAlignment.load(args.table, teacher=teacher, student=student)
    else:
        table = get_or_build(teacher, student, progress=not args.json)
    report = vocabulary_report(table, teacher, student, text=text, samples=args.samples)
    if args.plot is not None:
        report["plot"] = plot_report(report, args.plot)
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        print(format_report(report))
        if args.plot is not None:
            print(f"\nplot written to {args.plot}")
    return 0
