"""Each shipped table in alignment_tables/ loads, matches its tokenizers' fingerprints, and spells its tokens."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import tokenizer_path

TABLES = Path(__file__).resolve().parents[1] / "alignment_tables"
EXPECTED = ["gpt2__qwen2.5", "llama3.2__mistral", "qwen2.5__llama3.2", "qwen2.5__mistral"]


def test_all_four_pairs_are_shipped():
    assert sorted(p.stem for p in TABLES.glob("*.safetensors")) == EXPECTED
    readme = (TABLES / "README.md").read_text(encoding="utf-8")
    assert all(name in readme for name in EXPECTED)


@pytest.mark.parametrize("stem", EXPECTED)
def test_shipped_table_matches_its_tokenizers(stem):
    from xtok_kd.tokenizer import load_tokenizer
    from xtok_kd.vocab import VocabAlignment

    table = VocabAlignment.load(TABLES / f"{stem}.safetensors")  # validates format, shapes, checksum
    teacher_name, student_name = stem.split("__")
    assert os.path.basename(table.teacher_name) == teacher_name
    assert os.path.basename(table.student_name) == student_name
    assert table.metadata["command"].startswith("xtok-kd align ")
    teacher = load_tokenizer(tokenizer_path(teacher_name))  # skips when the tokenizer is not available
    student = load_tokenizer(tokenizer_path(student_name))
    table.check_tokenizers(teacher=teacher, student=student)
    assert table.metadata["format_version"] == 2 and table.metadata["parameters"]["neighbours"] == 8
    for view, lengths in ((teacher, table.teacher_token_lengths), (student, table.student_token_lengths)):
        expected = [0 if i in view.special_ids else len(b) for i, b in enumerate(view.all_token_bytes())]
        assert lengths.tolist() == expected
    for d, source, target in (("t2s", teacher, student), ("s2t", student, teacher)):
        offsets = getattr(table, f"{d}_offsets").tolist()
        pieces = getattr(table, f"{d}_pieces").tolist()
        tb = target.all_token_bytes()
        wrong = [i for i, b in enumerate(source.all_token_bytes()) if i not in source.special_ids
                 and b"".join(tb[p] for p in pieces[offsets[i]:offsets[i + 1]]) != b]
        assert wrong == [], f"{stem} {d}: {len(wrong)} decompositions do not spell their token"
