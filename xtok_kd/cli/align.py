"""``xtok-kd align TEACHER STUDENT -o PATH``: build a vocabulary table and save it."""

from __future__ import annotations

import argparse
import os
import time

from . import CliError, open_tokenizer


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("align", help="build a vocabulary table for a teacher/student pair and save it",
                       description="Build the exact / projection / neighbour / special-token table of two "
                                   "tokenizers and save it as .safetensors with both fingerprints.")
    p.add_argument("teacher", help="teacher tokenizer: folder with tokenizer.json, or hub id")
    p.add_argument("student", help="student tokenizer: folder with tokenizer.json, or hub id")
    p.add_argument("-o", "--output", required=True, help="where to write the table (.safetensors)")
    p.add_argument("--neighbours", type=int, default=4, help="edit-distance neighbours per unmatched token (4)")
    p.add_argument("--window", type=int, default=8, help="neighbour-search window per sort order (8)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from ..vocab import VocabAlignment

    if not args.output.endswith(".safetensors"):
        raise CliError(f"--output {args.output!r} should end in .safetensors")
    folder = os.path.dirname(os.path.abspath(args.output))
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise CliError(f"--output {args.output!r}: {folder!r} is not a folder")
    start = time.perf_counter()
    teacher = open_tokenizer(args.teacher, role="teacher")
    student = open_tokenizer(args.student, role="student")
    loaded = time.perf_counter()
    table = VocabAlignment.build(teacher, student, neighbours=args.neighbours, window=args.window,
                                 command=args.command_line, progress=not args.no_progress)
    built = time.perf_counter()
    table.save(args.output)
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
