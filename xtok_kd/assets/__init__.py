"""Embedded tokenizers and sample text (see README.md in this folder)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["ASSETS", "EMBEDDED_TOKENIZERS", "SAMPLE_TEXT", "embedded_tokenizer"]

ASSETS = Path(__file__).resolve().parent
EMBEDDED_TOKENIZERS = ("qwen2.5", "mistral", "gpt2")
SAMPLE_TEXT = ASSETS / "sample.txt"


def embedded_tokenizer(name: str) -> Path | None:
    """Folder of an embedded tokenizer called ``name`` (``"qwen2.5"``, ``"mistral"``, ``"gpt2"``), else None."""
    path = ASSETS / "tokenizers" / name
    return path if name in EMBEDDED_TOKENIZERS and (path / "tokenizer.json").is_file() else None
