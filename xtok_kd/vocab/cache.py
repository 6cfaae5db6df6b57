"""Build-on-first-use cache of vocabulary tables, keyed by both tokenizers' fingerprints.

Where: ``$XTOK_KD_CACHE`` if set, else ``$XDG_CACHE_HOME/xtok_kd/tables``, else ``~/.cache/xtok_kd/tables``. The
file name holds both fingerprints, the format version and the build parameters, so a changed tokenizer or a newer
xtok_kd never reuses a stale table: entries of an older format keep their own names and are left alone, and a file
of another version found under this version's name fails validation and is rebuilt (with a warning).

Many processes may share one cache (DDP ranks, parallel jobs, several users): a valid entry is read without a
lock; a missing or damaged one is built by one process at a time under ``<entry>.lock`` (:mod:`filelock`), and the
others wait and then load it. Entries are written atomically with the permissions of the writer's umask. When the
cache cannot be used (unreadable entry, read-only folder, no lock), the table is built in memory with a warning.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ..tokenizer import load_tokenizer
from .files import remove_stale_temps
from .table import FORMAT_VERSION, VocabAlignment, check_build_options, table_file_problem

__all__ = ["cache_dir", "cache_path", "get_or_build"]

logger = logging.getLogger("xtok_kd.vocab")

LOCK_TIMEOUT_S = 1800.0  # longest wait for another process's build before building in memory


def cache_dir() -> Path:
    """The folder holding cached tables (not created here)."""
    env = os.environ.get("XTOK_KD_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "xtok_kd" / "tables"


def cache_path(teacher_fingerprint: str, student_fingerprint: str, *, neighbours: int, window: int) -> Path:
    """Where the table of one tokenizer pair and parameter set is cached."""
    name = f"{teacher_fingerprint}-{student_fingerprint}-v{FORMAT_VERSION}-k{neighbours}-w{window}.safetensors"
    return cache_dir() / name


class _Unusable(Exception):
    """The cache entry exists but cannot be read: build in memory, never replace it."""


def _load_cached(path: Path, t_view: Any, s_view: Any, *, warn: bool = True) -> VocabAlignment | None:
    """The valid cached table at ``path``, or None when there is none or it is damaged (then with a warning).

    Raises :class:`_Unusable` when the entry exists but this process cannot read it.
    """
    if not path.is_file():
        return None
    try:
        table = VocabAlignment.load(path, teacher=t_view, student=s_view)
    except FileNotFoundError:
        return None  # removed meanwhile
    except OSError as err:
        raise _Unusable(str(err)) from None
    except ValueError as err:
        if warn:
            logger.warning("xtok_kd: rebuilding cached vocabulary table %s: %s", path, err)
        return None
    logger.info("xtok_kd: using cached vocabulary table %s", path)
    return table


def _build_unreadable(t_view: Any, s_view: Any, path: Path, err: Exception, options: dict) -> VocabAlignment:
    """An entry this process cannot read: build in memory, leave the entry as it is, and say so."""
    logger.warning("xtok_kd: cannot read cached vocabulary table %s (%s); building it in memory and leaving the "
                   "entry as it is; fix its permissions or set XTOK_KD_CACHE to a folder of your own", path, err)
    return _build(t_view, s_view, path, **options)


def get_or_build(teacher: Any, student: Any, *, neighbours: int = 8, window: int = 8,
                 progress: bool = False) -> VocabAlignment:
    """The cached table of ``teacher`` and ``student``, built and saved on first use.

    Args:
        teacher: anything :func:`~xtok_kd.tokenizer.load_tokenizer` accepts.
        student: likewise.
        neighbours: ``K`` neighbours (CDM candidates) per unmatched token (part of the cache key).
        window: neighbour-search window (part of the cache key).
        progress: show the build's progress bar.

    A cached file that fails validation (damaged, older format) is rebuilt and replaced, with a warning. One
    process builds a missing entry while the others wait on its lock and then load it. An entry this process cannot
    read, or a cache folder where no lock or file can be created, gives a table built in memory (not cached) and a
    warning; an unreadable entry is never replaced.

    Logs ``building vocabulary table`` (INFO) when it builds, ``using cached vocabulary table`` when it loads.
    """
    check_build_options(neighbours=neighbours, window=window)
    t_view, s_view = load_tokenizer(teacher), load_tokenizer(student)
    path = cache_path(t_view.fingerprint, s_view.fingerprint, neighbours=neighbours, window=window)
    options = {"neighbours": neighbours, "window": window, "progress": progress}
    try:
        table = _load_cached(path, t_view, s_view)
    except _Unusable as err:
        return _build_unreadable(t_view, s_view, path, err, options)
    if table is not None:
        return table
    warned = path.is_file()  # a file is there but it was not a valid table: the warning is out

    lock = _acquire_lock(path)
    if lock is None:
        return _build(t_view, s_view, path, **options)
    try:
        remove_stale_temps(path.parent)
        try:  # another process may have built it while this one waited
            table = _load_cached(path, t_view, s_view, warn=not warned)
        except _Unusable as err:
            return _build_unreadable(t_view, s_view, path, err, options)
        if table is not None:
            return table
        table = _build(t_view, s_view, path, **options)
        _store(table, path)
        return table
    finally:
        _release_lock(lock, path)


def _build(t_view: Any, s_view: Any, path: Path, *, neighbours: int, window: int, progress: bool) -> VocabAlignment:
    logger.info("xtok_kd: building vocabulary table %s -> %s (cached at %s)", t_view.name, s_view.name, path)
    return VocabAlignment.build(t_view, s_view, neighbours=neighbours, window=window, progress=progress)


def _store(table: VocabAlignment, path: Path) -> None:
    """Save ``table`` as the entry at ``path``, replacing a damaged entry; failures are warnings."""
    if os.path.lexists(path) and not path.is_dir() and table_file_problem(path) is not None:
        # the entry is this cache's own name, but its content is not a table (garbage, truncated header)
        try:
            os.unlink(path)
        except OSError as err:
            logger.warning("xtok_kd: cannot remove the damaged cache entry %s (%s); the table stays in memory",
                           path, err)
            return
    try:
        table.save(path, overwrite=True)
    except OSError as err:
        logger.warning("xtok_kd: could not cache the vocabulary table at %s: %s; set XTOK_KD_CACHE", path, err)
        return
    logger.info("xtok_kd: saved vocabulary table to %s (set XTOK_KD_CACHE to move the cache)", path)


def _acquire_lock(path: Path) -> Any:
    """The held lock of ``path``'s entry, or None (with a warning) when no lock can be had."""
    from filelock import FileLock, Timeout

    lock_file = f"{path}.lock"
    try:
        os.makedirs(path.parent, exist_ok=True)
        lock = FileLock(lock_file)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            logger.info("xtok_kd: waiting for another process to build %s (lock %s)", path, lock_file)
            lock.acquire(timeout=LOCK_TIMEOUT_S)
    except Timeout:
        logger.warning("xtok_kd: waited %.0f s for the lock %s; building the vocabulary table in memory "
                       "(remove the lock file if no other process is building it)", LOCK_TIMEOUT_S, lock_file)
        return None
    except OSError as err:
        logger.warning("xtok_kd: cannot lock the vocabulary table cache at %s (%s); building the table in memory, "
                       "not cached; set XTOK_KD_CACHE to a writable folder", lock_file, err)
        return None
    return lock


def _release_lock(lock: Any, path: Path) -> None:
    # every holder found or wrote the entry before this, so the lock file can go and the cache folder stays tidy;
    # a process that still waits on the removed file re-checks the entry after it gets the lock, as every holder does
    try:
        os.unlink(f"{path}.lock")
    except OSError:
        pass
    try:
        lock.release()
    except OSError as err:
        logger.warning("xtok_kd: could not release the lock %s.lock: %s", path, err)
