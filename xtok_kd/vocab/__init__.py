"""Vocabulary mapping: exact matches, projections, edit-distance neighbours and special-token roles, saved as a
fingerprinted table (:class:`VocabAlignment`) and cached on first use (:func:`get_or_build`)."""

from .cache import cache_dir, get_or_build
from .table import FORMAT_VERSION, VocabAlignment

__all__ = ["FORMAT_VERSION", "VocabAlignment", "cache_dir", "get_or_build"]
