"""``xtok-kd inspect TEACHER STUDENT``: what the two vocabularies share, as text, JSON and a picture.

Every option (tokenizer names, ``--table``, ``--text``, ``--plot``, ``--samples``) is checked before a tokenizer is
loaded or a table built; all problems are reported together."""

from __future__ import annotations

import argparse
import json
import os

from . import check_int, fail_if_any, open_tokenizer, tokenizer_problem


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
    p.add_argument("--plot", help="write a picture of the report here: .png, .pdf or .svg (an existing file is "
                                  "replaced only if it is an earlier xtok-kd plot)")
    p.add_argument("--samples", type=int, default=8, help="unmatched tokens shown per side, >= 0 (8)")


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def _read_text(path: str) -> tuple[str | None, str | None]:
    """``(text, problem)`` of the ``--text`` file."""
    if "\0" in path:
        return None, f"--text {path!r} contains a NUL character; pass a UTF-8 text file"
    if not os.path.exists(path):
        return None, f"--text {path!r}: no such file; pass a UTF-8 text file (or --text '' to skip)"
    if not os.path.isfile(path):
        return None, f"--text {path!r} is not a regular file; pass a UTF-8 text file (or --text '' to skip)"
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as err:
        return None, f"--text {path!r} is not UTF-8 ({err}); convert it (iconv -t utf-8) or pass another file"
    except OSError as err:
        return None, f"--text {path!r} cannot be read ({err.strerror or err}); pass a readable UTF-8 text file"
    if not text:
        return None, f"--text {path!r} is empty; pass a UTF-8 text file with some text (or --text '' to skip)"
    return text, None


def check(args: argparse.Namespace) -> tuple[list[str], str | None]:
    """``(problems, text)``: every problem with the options, found without loading a tokenizer or a table."""
    from ..assets import SAMPLE_TEXT
    from ..vocab.report import check_plot_target
    from ..vocab.table import table_file_problem

    problems = [p for p in (tokenizer_problem(args.teacher, role="teacher"),
                            tokenizer_problem(args.student, role="student")) if p]
    build = "build one with `xtok-kd align TEACHER STUDENT -o TABLE.safetensors`, or leave --table out"
    if args.table is not None:
        if not args.table or "\0" in args.table:
            problems.append(f"--table {args.table!r} is not a file path; {build}")
        elif not os.path.exists(args.table):
            problems.append(f"--table {args.table!r}: no such file; build one with "
                            f"`xtok-kd align TEACHER STUDENT -o {args.table}`, or leave --table out")
        elif os.path.isdir(args.table):
            problems.append(f"--table {args.table!r} is a folder; pass the .safetensors table file inside it")
        elif (reason := table_file_problem(args.table)) is not None:
            problems.append(f"--table {args.table!r} {reason}; {build}")
    text = None
    text_path = str(SAMPLE_TEXT) if args.text is None else args.text
    if text_path:
        text, problem = _read_text(text_path)
        if problem:
            problems.append(problem)
    if args.plot is not None:
        same = [option for option, other in (("--text", text_path), ("--table", args.table))
                if other and _same_file(args.plot, other)]
        if same:
            problems.append(f"--plot {args.plot!r} is the {same[0]} file; write the plot somewhere else")
        else:
            try:
                check_plot_target(args.plot)
            except (OSError, ValueError, ImportError) as err:
                problems.append(f"--plot: {err}")
    problem = check_int("--samples", args.samples, low=0)
    if problem:
        problems.append(problem)
    return problems, text


def run(args: argparse.Namespace) -> int:
    from ..vocab import VocabAlignment, get_or_build
    from ..vocab.report import format_report, plot_report, vocabulary_report

    problems, text = check(args)
    fail_if_any(problems)
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
