"""The ``xtok-kd`` command line: one module per subcommand (``align``, ``inspect``), dispatched by ``main``."""

from __future__ import annotations

import os
from typing import Any

__all__ = ["CliError", "open_tokenizer"]


class CliError(Exception):
    """A problem with the user's input; ``main`` prints it without a traceback and exits with status 2."""


def open_tokenizer(value: str, *, role: str) -> Any:
    """Load the tokenizer named on the command line, or raise :class:`CliError` saying what to pass instead."""
    from ..tokenizer import load_tokenizer

    looks_like_path = os.sep in value or value.startswith(".") or os.path.exists(value)
    if looks_like_path and not os.path.isdir(value):
        raise CliError(
            f"{role} tokenizer {value!r}: no such folder; pass a folder that contains tokenizer.json "
            "(e.g. ../shared/tokenizers/qwen2.5) or a Hugging Face hub id"
        )
    if looks_like_path and not os.path.isfile(os.path.join(value, "tokenizer.json")):
        raise CliError(
            f"{role} tokenizer {value!r}: the folder has no tokenizer.json; save the fast tokenizer there "
            "(AutoTokenizer.from_pretrained(...).save_pretrained(folder))"
        )
    try:
        return load_tokenizer(value)
    except (ValueError, OSError) as err:
        raise CliError(f"{role} tokenizer {value!r} could not be loaded: {err}") from None
