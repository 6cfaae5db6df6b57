"""Integrations: a ``transformers.Trainer`` for cross-tokenizer distillation, model loading, evaluation.

Imported lazily (``from xtok_kd.integrations import CrossTokenizerKDTrainer``) so that ``import xtok_kd`` never
imports transformers' Trainer.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CrossTokenizerKDTrainer": "xtok_kd.integrations.trainer",
    "DistillationCollator": "xtok_kd.integrations.trainer",
    "load_causal_lm": "xtok_kd.integrations.models",
    "load_model_tokenizer": "xtok_kd.integrations.models",
    "tiny_llama": "xtok_kd.integrations.models",
    "bits_per_byte": "xtok_kd.integrations.evaluate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'xtok_kd.integrations' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
