"""The ``xtok-kd`` command line: one module per subcommand (``align``, ``inspect``), dispatched by ``main``.

Each subcommand checks every option first, cheaply (paths, folders, formats, numbers, tokenizer names), and reports
all problems at once before loading a tokenizer or building anything; user errors exit with status 2 and a message
that names the value and the fix, never a traceback.
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterable

__all__ = ["CliError", "check_int", "fail_if_any", "open_tokenizer", "tokenizer_problem"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


class CliError(Exception):
    """A problem with the user's input; ``main`` prints it without a traceback and exits with status 2."""


def fail_if_any(problems: Iterable[str]) -> None:
    """Raise one :class:`CliError` listing every problem (none: return)."""
    problems = list(problems)
    if len(problems) == 1:
        raise CliError(problems[0])
    if problems:
        raise CliError(f"{len(problems)} problems with the command line:\n" + "\n".join(f"  - {p}" for p in problems))


def check_int(option: str, value: Any, *, low: int, high: int | None = None) -> str | None:
    """A problem message unless ``value`` is an int in ``[low, high]``."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high):
        return None
    span = f"from {low} to {high}" if high is not None else f">= {low}"
    return f"{option} {value!r}: must be an integer {span}"


def tokenizer_problem(value: str, *, role: str) -> str | None:
    """Why ``value`` cannot name a tokenizer, found without loading it (None: it may; loading decides)."""
    from ..assets import EMBEDDED_TOKENIZERS, embedded_tokenizer

    embedded = ", ".join(EMBEDDED_TOKENIZERS)
    if not value:
        return (f"{role} tokenizer is empty; pass a folder with tokenizer.json, a hub id or an embedded name "
                f"({embedded})")
    if "\0" in value:
        return f"{role} tokenizer {value!r} contains a NUL character; pass a folder, a hub id or an embedded name"
    if os.path.exists(value):
        if os.path.isfile(value) and os.path.basename(value) == "tokenizer.json":
            return None
        if not os.path.isdir(value):
            return (f"{role} tokenizer {value!r} is a file; pass the folder that contains tokenizer.json "
                    "(e.g. ../shared/tokenizers/qwen2.5)")
        if not os.path.isfile(os.path.join(value, "tokenizer.json")):
            return (f"{role} tokenizer {value!r}: the folder has no tokenizer.json; save the fast tokenizer there "
                    "(AutoTokenizer.from_pretrained(...).save_pretrained(folder))")
        return None
    if embedded_tokenizer(value) is not None:
        return None
    if value.startswith((".", "~", os.sep)) or (os.altsep and os.altsep in value) or not _HUB_ID.match(value) \
            or ".." in value:
        return (f"{role} tokenizer {value!r}: no such folder; pass a folder that contains tokenizer.json "
                f"(e.g. ../shared/tokenizers/qwen2.5), a Hugging Face hub id, or an embedded name ({embedded})")
    return None  # a hub id: only loading can tell


def open_tokenizer(value: str, *, role: str) -> Any:
    """Load the tokenizer named on the command line, or raise :class:`CliError` saying what to pass instead."""
    from ..tokenizer import load_tokenizer

    problem = tokenizer_problem(value, role=role)
    if problem is not None:
        raise CliError(problem)
    try:
        return load_tokenizer(value)
    except ValueError as err:  # load_tokenizer's own message names the value and the fix
        raise CliError(f"{role} tokenizer: {err}") from None
    except Exception as err:  # a user's file or hub id: any failure to read it is an input problem
        from difflib import get_close_matches

        from ..assets import EMBEDDED_TOKENIZERS

        close = get_close_matches(value, EMBEDDED_TOKENIZERS, n=1)
        hint = f"did you mean the embedded {close[0]!r}? Otherwise pass" if close else "pass"
        raise CliError(f"{role} tokenizer {value!r} could not be loaded ({type(err).__name__}: {err}); {hint} a "
                       "folder with a valid tokenizer.json, a reachable hub id (offline: only one already in the "
                       "Hugging Face cache), or an embedded name") from None
