"""Vocabulary mappings, one module each, behind the small protocol of :mod:`.base`.

Adding a mapping: write ``mappings/<name>.py`` with a :class:`~.base.MappingMethod` subclass and add one line to
:data:`MAPPINGS` (and its name to ``MappingName`` in :mod:`..options`).
"""

from __future__ import annotations

from .alm import AlmMapping
from .base import MappingMethod
from .cdm import CdmMapping
from .hybrid import HybridMapping, hybrid_rows
from .projection import ProjectionMapping, projection_rows
from .sinkhorn import SinkhornMapping
from .uld import UldMapping, uld_rows

__all__ = ["MAPPINGS", "MappingMethod", "hybrid_rows", "projection_rows", "uld_rows"]

MAPPINGS: dict[str, type[MappingMethod]] = {
    "projection": ProjectionMapping,
    "uld": UldMapping,
    "hybrid": HybridMapping,
    "alm": AlmMapping,
    "cdm": CdmMapping,
    "sinkhorn": SinkhornMapping,
}
