"""Build-on-first-use cache keyed by both fingerprints, under $XTOK_KD_CACHE: permissions follow the umask, an
unreadable entry or a folder without a lock gives an in-memory table and a warning."""

from __future__ import annotations

import logging
import os
import stat

import pytest

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


# ---------------------------------------------------------------------- permissions, unreadable entries, locks
@pytest.fixture()
def umask():
    """Set the process umask for one test and restore it."""
    saved = []

    def set_(mask):
        saved.append(os.umask(mask))

    yield set_
    if saved:
        os.umask(saved[0])


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_cached_table_mode_follows_the_umask(tmp_path, monkeypatch, umask, mask, mode):
    from xtok_kd.vocab import get_or_build

    monkeypatch.setenv("XTOK_KD_CACHE", str(tmp_path / "cache"))
    umask(mask)
    get_or_build("gpt2", "gpt2", neighbours=0)
    (entry,) = (tmp_path / "cache").glob("*.safetensors")
    assert stat.S_IMODE(entry.stat().st_mode) == mode
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [entry.name]  # no lock or temp file left


def test_unreadable_entry_gives_an_in_memory_table_and_a_warning(tmp_path, monkeypatch, caplog):
    from xtok_kd.tokenizer import load_tokenizer
    from xtok_kd.vocab import VocabAlignment, get_or_build
    from xtok_kd.vocab.cache import cache_path

    monkeypatch.setenv("XTOK_KD_CACHE", str(tmp_path))
    teacher, student = load_tokenizer("gpt2"), load_tokenizer("mistral")
    get_or_build(teacher, student, neighbours=1)
    path = cache_path(teacher.fingerprint, student.fingerprint, neighbours=1, window=8)
    before = path.read_bytes()
    if os.geteuid() == 0:  # root reads anything: make the read fail the way it fails for another user
        def denied(*args, **kwargs):
            raise PermissionError(13, "Permission denied", str(path))

        monkeypatch.setattr(VocabAlignment, "load", denied)
    else:
        path.chmod(0)
    try:
        with caplog.at_level(logging.INFO, logger="xtok_kd.vocab"):
            table = get_or_build(teacher, student, neighbours=1)
    finally:
        path.chmod(0o644)
    assert table.teacher_fingerprint == teacher.fingerprint and table.student_fingerprint == student.fingerprint
    assert table.exact_teacher.shape[0] > 1000 and int(table.t2s_first[0]) >= 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "cannot read cached vocabulary table" in warnings[0].getMessage()
    assert str(path) in warnings[0].getMessage()
    assert "building vocabulary table" in caplog.text
    assert path.read_bytes() == before  # never replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_cache_folder_where_no_lock_can_be_made_builds_in_memory(tmp_path, monkeypatch, caplog):
    from xtok_kd.vocab import get_or_build

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("XTOK_KD_CACHE", str(blocker / "cache"))
    with caplog.at_level(logging.WARNING, logger="xtok_kd.vocab"):
        table = get_or_build("gpt2", "gpt2", neighbours=0)
    assert table.exact_teacher.shape[0] == table.teacher_vocab_size - len(table.special_teacher)
    assert "cannot lock" in caplog.text and "in memory" in caplog.text
    assert blocker.read_text() == "a file where the cache folder should be"


def test_read_only_cache_folder_builds_in_memory(tmp_path, monkeypatch, caplog):
    from xtok_kd.vocab import get_or_build

    cache = tmp_path / "cache"
    cache.mkdir()
    if os.geteuid() == 0:  # root may write anywhere: fail the lock's creation as a read-only folder would
        import filelock

        class ReadOnly(filelock.FileLock):
            def acquire(self, *args, **kwargs):
                raise PermissionError(13, "Permission denied", str(self.lock_file))

        monkeypatch.setattr(filelock, "FileLock", ReadOnly)
    else:
        cache.chmod(0o555)
    monkeypatch.setenv("XTOK_KD_CACHE", str(cache))
    try:
        with caplog.at_level(logging.WARNING, logger="xtok_kd.vocab"):
            table = get_or_build("gpt2", "gpt2", neighbours=0)
    finally:
        cache.chmod(0o755)
    assert table.teacher_vocab_size == 50257
    assert "cannot lock" in caplog.text and "XTOK_KD_CACHE" in caplog.text
    assert list(cache.iterdir()) == []


def test_bad_options_fail_before_loading_tokenizers(monkeypatch):
    import xtok_kd.vocab.cache as cache

    def no_load(*args, **kwargs):
        raise AssertionError("a tokenizer was loaded before the options were checked")

    monkeypatch.setattr(cache, "load_tokenizer", no_load)
    for kwargs in ({"neighbours": -1}, {"window": 0}, {"neighbours": "4"}, {"window": True}):
        with pytest.raises(ValueError, match="must be an int"):
            cache.get_or_build("gpt2", "mistral", **kwargs)


# ---------------------------------------------------------------------- tables of an older format version
def test_stale_version_1_entries_are_never_used(tmp_path, monkeypatch, caplog):
    from xtok_kd.tokenizer import load_tokenizer
    from xtok_kd.vocab import FORMAT_VERSION, VocabAlignment, get_or_build
    from xtok_kd.vocab.cache import cache_path

    from test_vocab_table import write_v1_table

    monkeypatch.setenv("XTOK_KD_CACHE", str(tmp_path))
    teacher, student = load_tokenizer(tokenizer_path("gpt2")), load_tokenizer(tokenizer_path("mistral"))
    old = VocabAlignment.build(teacher, student, neighbours=1, progress=False)
    path = cache_path(teacher.fingerprint, student.fingerprint, neighbours=1, window=8)
    assert f"-v{FORMAT_VERSION}-" in path.name
    # what xtok_kd 0.1.0 left in the cache: its own name, with v1 in it
    v1_entry = path.with_name(path.name.replace(f"-v{FORMAT_VERSION}-", "-v1-"))
    v1_bytes = open(write_v1_table(old, v1_entry), "rb").read()
    # and a v1 file under this version's name (copied there by hand, or a key without the version)
    write_v1_table(old, path)
    with caplog.at_level(logging.INFO, logger="xtok_kd.vocab"):
        table = get_or_build(teacher, student, neighbours=1)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "rebuilding" in warnings[0] and "format version 1" in warnings[0]
    assert table.metadata["format_version"] == FORMAT_VERSION
    assert VocabAlignment.load(path, teacher, student).metadata == table.metadata  # replaced by a v2 table
    assert v1_entry.read_bytes() == v1_bytes  # the old entry is left as it is
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, v1_entry.name])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="xtok_kd.vocab"):
        again = get_or_build(teacher, student, neighbours=1)
    assert "using cached" in caplog.text and again.metadata == table.metadata
