"""xtok_kd: knowledge distillation between models with different tokenizers.

Three stages, each swappable (see the README): sequence alignment (which teacher and student tokens cover the
same bytes), vocabulary mapping (how the two distributions are made comparable) and divergence. The public names
below are imported lazily, so ``import xtok_kd`` is cheap and has no side effects.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "TokenizerView": "xtok_kd.tokenizer",
    "Encoding": "xtok_kd.tokenizer",
    "load_tokenizer": "xtok_kd.tokenizer",
    "Alignment": "xtok_kd.sequence",
    "AlignedRows": "xtok_kd.sequence",
    "align_spans": "xtok_kd.sequence",
    "align_tokens": "xtok_kd.sequence",
    "CrossTokenizerCollator": "xtok_kd.data",
    "VocabAlignment": "xtok_kd.vocab",
    "get_or_build": "xtok_kd.vocab",
    "CrossTokenizerKDLoss": "xtok_kd.losses",
    "KDLossOutput": "xtok_kd.losses",
    "TeacherTopK": "xtok_kd.losses",
    "TeacherCache": "xtok_kd.teacher_cache",
    "write_teacher_cache": "xtok_kd.teacher_cache",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'xtok_kd' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
