"""Build-on-first-use cache of vocabulary tables, keyed by both tokenizers' fingerprints.

Where: ``$XTOK_KD_CACHE`` if set, else ``$XDG_CACHE_HOME/xtok_kd/tables``, else ``~/.cache/xtok_kd/tables``. The
file name holds both fingerprints and the build parameters, so a changed tokenizer never reuses a stale table.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ..tokenizer import load_tokenizer
from .table import FORMAT_VERSION, VocabAlignment

__all__ = ["cache_dir", "cache_path", "get_or_build"]

logger = logging.getLogger("xtok_kd.vocab")


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


def get_or_build(teacher: Any, student: Any, *, neighbours: int = 4, window: int = 8,
                 progress: bool = False) -> VocabAlignment:
    """The cached table of ``teacher`` and ``student``, built and saved on first use.

    Args:
        teacher: anything :func:`~xtok_kd.tokenizer.load_tokenizer` accepts.
        student: likewise.
        neighbours: ``K`` neighbours per unmatched token (part of the cache key).
        window: neighbour-search window (part of the cache key).
        progress: show the build's progress bar.

    A cached file that fails validation (damaged, older format) is rebuilt and replaced, with a warning.
    """
    t_view, s_view = load_tokenizer(teacher), load_tokenizer(student)
    path = cache_path(t_view.fingerprint, s_view.fingerprint, neighbours=neighbours, window=window)
    if path.is_file():
        try:
            table = VocabAlignment.load(path, teacher=t_view, student=s_view)
            logger.info("xtok_kd: using cached vocabulary table %s", path)
            return table
        except ValueError as err:
            logger.warning("xtok_kd: rebuilding cached vocabulary table %s: %s", path, err)
    logger.info("xtok_kd: building vocabulary table %s -> %s (cached at %s)", t_view.name, s_view.name, path)
    table = VocabAlignment.build(t_view, s_view, neighbours=neighbours, window=window, progress=progress)
    try:
        table.save(path)
        logger.info("xtok_kd: saved vocabulary table to %s (set XTOK_KD_CACHE to move the cache)", path)
    except OSError as err:
        logger.warning("xtok_kd: could not cache the vocabulary table at %s: %s; set XTOK_KD_CACHE", path, err)
    return table
