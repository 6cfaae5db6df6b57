"""Build-on-first-use cache keyed by both fingerprints, under $XTOK_KD_CACHE."""

from __future__ import annotations

import logging

from conftest import tokenizer_path


def test_cache_builds_once_then_loads(tmp_path, monkeypatch, caplog):
    from xtok_kd.tokenizer import load_tokenizer
    from xtok_kd.vocab import cache_dir, get_or_build

    monkeypatch.setenv("XTOK_KD_CACHE", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache"
    teacher, student = load_tokenizer(tokenizer_path("gpt2")), load_tokenizer(tokenizer_path("mistral"))
    with caplog.at_level(logging.INFO, logger="xtok_kd.vocab"):
        first = get_or_build(teacher, student, neighbours=2)
    files = list((tmp_path / "cache").iterdir())
    assert len(files) == 1 and teacher.fingerprint in files[0].name and student.fingerprint in files[0].name
    assert str(files[0]) in caplog.text and "building" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="xtok_kd.vocab"):
        second = get_or_build(teacher, student, neighbours=2)
    assert "using cached" in caplog.text
    assert second.metadata == first.metadata


def test_damaged_cache_entry_is_rebuilt(tmp_path, monkeypatch, caplog):
    from xtok_kd.tokenizer import load_tokenizer
    from xtok_kd.vocab import get_or_build
    from xtok_kd.vocab.cache import cache_path

    monkeypatch.setenv("XTOK_KD_CACHE", str(tmp_path))
    teacher, student = load_tokenizer(tokenizer_path("gpt2")), load_tokenizer(tokenizer_path("mistral"))
    path = cache_path(teacher.fingerprint, student.fingerprint, neighbours=1, window=8)
    path.write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="xtok_kd.vocab"):
        table = get_or_build(teacher, student, neighbours=1)
    assert "rebuilding" in caplog.text
    assert table.teacher_fingerprint == teacher.fingerprint and path.stat().st_size > 1000
