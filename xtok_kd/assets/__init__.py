"""Embedded tokenizers and sample text (see README.md in this folder)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["ASSETS", "EMBEDDED_TOKENIZERS", "SAMPLE_TEXT", "embedded_tokenizer"]

ASSETS = Path(__file__).resolve().parent
EMBEDDED_TOKENIZERS = ("qwen2.5", "mistral", "gpt2")
SAMPLE_TEXT = ASSETS / "sample.txt"


def embedded_tokenizer(name: str) -> Path | None:
    """Folder of the embedded tokenizer called ``name`` (``"qwen2.5"``, ``"mistral"``, ``"gpt2"``; any letter
    case), else None."""
    if not isinstance(name, str):
        return None
    key = name.strip().lower()
    if key not in EMBEDDED_TOKENIZERS:
        return None
    path = ASSETS / "tokenizers" / key
    return path if (path / "tokenizer.json").is_file() else None
