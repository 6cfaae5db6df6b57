"""Sequence alignment: which teacher tokens and which student tokens cover the same bytes."""

from .alignment import AlignedRows, Alignment
from .dtw import align_tokens, dtw_path
from .spans import align_spans, pad_spans

__all__ = ["AlignedRows", "Alignment", "align_spans", "align_tokens", "dtw_path", "pad_spans"]
