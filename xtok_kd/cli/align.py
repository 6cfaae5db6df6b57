"""``xtok-kd align TEACHER STUDENT -o PATH [--force]``: build a vocabulary table and save it.

Every option is checked before the tokenizers are loaded; an existing ``PATH`` is replaced only with ``--force`` and
only when it is an xtok_kd table."""

from __future__ import annotations

import argparse
import os
import time

from . import check_int, fail_if_any, open_tokenizer, tokenizer_problem


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("align", help="build a vocabulary table for a teacher/student pair and save it",
                       description="Build the exact / projection / neighbour / special-token table of two "
                                   "tokenizers and save it as .safetensors with both fingerprints.")
    p.add_argument("teacher", help="teacher tokenizer: folder with tokenizer.json, hub id, or an embedded name "
                                   "(qwen2.5, mistral, gpt2)")
    p.add_argument("student", help="student tokenizer: folder with tokenizer.json, hub id, or an embedded name")
    p.add_argument("-o", "--output", required=True,
                   help="where to write the table (.safetensors); an existing file is refused unless --force")
    p.add_argument("--neighbours", type=int, default=8,
                   help="edit-distance neighbours per unmatched token (the CDM candidates), 0 to 256 (8)")
    p.add_argument("--window", type=int, default=8, help="neighbour-search window per sort order, 1 to 4096 (8)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing table at --output (a file that is not an xtok_kd table is never replaced)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


MAX_NEIGHBOURS = 256
MAX_WINDOW = 4096


def check(args: argparse.Namespace) -> list[str]:
    """Every problem with the options, found without loading a tokenizer or building anything."""
    from ..vocab.table import check_save_target

    problems = [p for p in (tokenizer_problem(args.teacher, role="teacher"),
                            tokenizer_problem(args.student, role="student")) if p]
    output = args.output
    if output and "\0" not in output and not os.path.isdir(output) and not output.endswith(".safetensors"):
        problems.append(f"--output {output!r} should end in .safetensors (e.g. pair.safetensors)")
    else:
        try:
            check_save_target(output, overwrite=args.force, force_hint="--force", create_folder=False)
        except (OSError, ValueError) as err:
            problems.append(f"--output: {err}")
    problems += [p for p in (check_int("--neighbours", args.neighbours, low=0, high=MAX_NEIGHBOURS),
                             check_int("--window", args.window, low=1, high=MAX_WINDOW)) if p]
    return problems


def run(args: argparse.Namespace) -> int:
    from ..vocab import VocabAlignment

    fail_if_any(check(args))
    start = time.perf_counter()
    teacher = open_tokenizer(args.teacher, role="teacher")
    student = open_tokenizer(args.student, role="student")
    loaded = time.perf_counter()
    table = VocabAlignment.build(teacher, student, neighbours=args.neighbours, window=args.window,
                                 command=args.command_line, progress=not args.no_progress)
    built = time.perf_counter()
    table.save(args.output, overwrite=args.force)
    st = table.stats
    print(f"table: {args.output} ({os.path.getsize(args.output) / 1e6:.1f} MB)")
    print(f"teacher: {table.teacher_name} [{table.teacher_fingerprint}] {table.teacher_vocab_size:,} ids")
    print(f"student: {table.student_name} [{table.student_fingerprint}] {table.student_vocab_size:,} ids")
    print(f"exact pairs: {int(st['exact_pairs']):,} ({st['exact_teacher_share']:.1%} of teacher, "
          f"{st['exact_student_share']:.1%} of student non-special tokens)")
    for d, name in (("t2s", "teacher->student"), ("s2t", "student->teacher")):
        print(f"{name}: mapped {st[f'{d}_mapped_share']:.1%}, single piece {st[f'{d}_single_piece_share']:.1%}, "
              f"mean pieces {st[f'{d}_mean_pieces']:.2f}, neighbours for {int(st[f'{d}_neighbour_rows']):,} tokens")
    print(f"special pairs: {', '.join(table.metadata['special_roles']) or 'none'}")
    print(f"time: load tokenizers {loaded - start:.1f} s, build {built - loaded:.1f} s")
    return 0
